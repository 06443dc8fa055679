// ReLU backward in one pass: gx = g where the forward's output y was positive, an exact 0
// elsewhere, in g's dtype. (cupy.where over a comparison took two passes and a bool temporary,
// and promoted bfloat16 gradients to float32 through the scalar 0: profiled on the H200.)
// Launch: any 1-D grid (grid-stride loop).
#include "accum.cuh"

template <typename T>
__global__ void relu_bwd(const T* __restrict__ y, const T* __restrict__ g, T* __restrict__ gx,
                         long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        gx[i] = cd_load(y[i]) > 0 ? g[i] : cd_store<T>(0);
}

#ifdef CUDROP_INSTANTIATE
#define CD_INST(T) template __global__ void relu_bwd<T>(const T*, const T*, T*, long long);
CD_INST(float)
CD_INST(double)
CD_INST(cd_f16)
CD_INST(cd_bf16)
#endif
