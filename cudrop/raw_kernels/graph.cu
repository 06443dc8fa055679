// The conditions of a captured step's IF nodes (cudrop/graph.py: a gated part of the step, a
// depth-dropout unit's body, is an IF node's body graph). One launch at the head of the graph
// sets every node's condition from its gate's flag, which the host uploads before each replay
// with the step's other device scalars: one small kernel a step instead of one per node.
//
// cudaGraphSetConditional is the CUDA runtime's device function (cuda_device_runtime_api.h,
// which NVRTC does not see); the driver resolves it when the module loads, so no -rdc.
extern "C" __device__ void cudaGraphSetConditional(unsigned long long handle, unsigned int value);

// table: [0] the number of nodes n; [1 + 2i] node i's condition handle, [2 + 2i] the index of
// its gate's flag in flags (0: skip the body, else run it). One CTA; each handle set once.
__global__ void set_conditions(const unsigned long long* __restrict__ table,
                               const unsigned int* __restrict__ flags) {
    const unsigned long long n = table[0];
    for (unsigned long long i = threadIdx.x; i < n; i += blockDim.x)
        cudaGraphSetConditional(table[1 + 2 * i], flags[table[2 + 2 * i]] != 0u ? 1u : 0u);
}
