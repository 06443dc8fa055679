// Block masks in one launch: draw every block's keep bit (Philox), pack the bits, and build the
// per-row lists of kept K-blocks and the per-column lists of kept row blocks. CTAs [0, nM) own a
// row, CTAs [nM, nM + nK) a column; a column CTA redraws its cells instead of waiting for the
// rows, which a counter-based generator makes free of coordination. Lists are ELL: line i's
// kept indices ascending in index[i, :count[i]], the rest -1. blockDim must be 256. A non-null
// step_ptr (a device step) replaces the by-value step, read when the kernel runs (CUDA graph
// replays draw the step the host wrote there last). Without row_ids the row coordinate is
// r + row_offset (a data-parallel rank's row blocks of the global batch).
#include "philox.cuh"
#include "dtypes.cuh"

extern "C" __global__ void block_mask(unsigned int* __restrict__ bits,
                                      int* __restrict__ row_count, int* __restrict__ row_index,
                                      int* __restrict__ col_count, int* __restrict__ col_index,
                                      const unsigned int* __restrict__ row_ids, int nM, int nK,
                                      long long words32_per_row, unsigned int seed,
                                      unsigned int layer, unsigned int step,
                                      const unsigned int* __restrict__ step_ptr, unsigned int tag,
                                      unsigned int thresh, unsigned int row_offset) {
    // read once per thread, before the loop: a uniform branch and one broadcast load
    const unsigned int step_now = step_ptr ? *step_ptr : step;
    __shared__ int warp_sums[8];
    __shared__ int running;
    const bool is_row = blockIdx.x < (unsigned int)nM;
    const int line = is_row ? (int)blockIdx.x : (int)blockIdx.x - nM;
    const int len = is_row ? nK : nM;
    int* index = is_row ? row_index + (long long)line * nK : col_index + (long long)line * nM;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (threadIdx.x == 0) running = 0;
    __syncthreads();
    for (int base = 0; base < len; base += blockDim.x) {
        const int t = base + threadIdx.x;
        bool keep = false;
        if (t < len) {
            const int r = is_row ? line : t, c = is_row ? t : line;
            const unsigned int rid = row_ids ? row_ids[r] : (unsigned int)r + row_offset;
            keep = cd_mask_word(seed, layer, step_now, tag, rid, (unsigned long long)c) >= thresh;
        }
        const unsigned int b = __ballot_sync(0xffffffffu, keep);
        if (is_row && lane == 0) {
            const long long w = (base >> 5) + warp;
            if (w < words32_per_row) bits[(long long)line * words32_per_row + w] = b;
        }
        if (lane == 0) warp_sums[warp] = __popc(b);
        __syncthreads();
        int offset = running;
        for (int w = 0; w < warp; ++w) offset += warp_sums[w];
        if (keep) index[offset + __popc(b & ((1u << lane) - 1u))] = t;
        __syncthreads();
        if (threadIdx.x == 0) {
            int s = 0;
            for (int w = 0; w < 8; ++w) s += warp_sums[w];
            running += s;
        }
        __syncthreads();
    }
    const int count = running;
    for (int t = count + threadIdx.x; t < len; t += blockDim.x) index[t] = -1;
    if (threadIdx.x == 0) (is_row ? row_count : col_count)[line] = count;
}

// A block mask applied to a C-contiguous (M, K) array: y = x * scale where the (mb, kb) block of
// the element is kept (BlockMask.bits: row block r's 64-bit word w at r * words + w, block c at
// bit c & 63 of word c >> 6), else an exact 0 (an inf or NaN in a dropped block does not leak).
// The dense fallback of the block-sparse GEMMs (bsmm) multiplies this copy. Thread t owns the
// V = 16 / sizeof(T) elements from V t. Where `vec` says K % V == 0 and x, y are 16-byte
// aligned, the V lie in one row: one 16-byte store, and where kb % V == 0 also in one block:
// one bit test, and a dropped block's x is not read. Else one element at a time. M and K are
// below 2**31 (the host checks); 32-bit index math where n fits (H200, 1024 x 4096 bf16: a
// 64-bit division and eight bit tests a thread ran 10.7 µs where a plain copy takes 4.1).
template <typename T>
__global__ void block_apply(const T* __restrict__ x, T* __restrict__ y, long long n, long long K,
                            const unsigned long long* __restrict__ bits, long long words, int mb,
                            int kb, double scale, int vec) {
    constexpr int V = 16 / sizeof(T);
    typedef cd_vec<T, V> vec_t;
    const long long i0 = V * ((long long)blockIdx.x * blockDim.x + threadIdx.x);
    if (i0 >= n) return;
    int row, col;
    if (n < (1ll << 32)) {
        const unsigned int u = (unsigned int)i0, k = (unsigned int)K;
        row = (int)(u / k);
        col = (int)(u - (unsigned int)row * k);
    } else {
        row = (int)(i0 / K);
        col = (int)(i0 - (long long)row * K);
    }
    int rb = row / mb, c = col / kb, in_c = col - c * kb;
    if (vec && kb % V == 0 && i0 + V <= n) {
        const bool keep = (bits[(long long)rb * words + (c >> 6)] >> (c & 63)) & 1ull;
        vec_t out{};
        if (keep) {
            const vec_t in = reinterpret_cast<const vec_t*>(x)[i0 / V];
#pragma unroll
            for (int j = 0; j < V; ++j) out.v[j] = cd_scale_or_zero(in.v[j], scale, true);
        }
        reinterpret_cast<vec_t*>(y)[i0 / V] = out;
        return;
    }
    bool keep[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
        keep[j] = i0 + j < n && ((bits[(long long)rb * words + (c >> 6)] >> (c & 63)) & 1ull);
        if (++col == (int)K) {
            col = c = in_c = 0;
            rb = ++row / mb;
        } else if (++in_c == kb) {
            in_c = 0;
            ++c;
        }
    }
    if (vec && i0 + V <= n) {
        const vec_t in = reinterpret_cast<const vec_t*>(x)[i0 / V];
        vec_t out;
#pragma unroll
        for (int j = 0; j < V; ++j) out.v[j] = cd_scale_or_zero(in.v[j], scale, keep[j]);
        reinterpret_cast<vec_t*>(y)[i0 / V] = out;
    } else {
        for (int j = 0; j < V && i0 + j < n; ++j)
            y[i0 + j] = cd_scale_or_zero(x[i0 + j], scale, keep[j]);
    }
}

#ifdef CUDROP_INSTANTIATE  // explicit instances for the nvcc compile check (NVRTC uses name_expressions)
#define CD_INST(T) \
    template __global__ void block_apply<T>(const T*, T*, long long, long long, \
        const unsigned long long*, long long, int, int, double, int);
CD_INST(float) CD_INST(double) CD_INST(cd_f16) CD_INST(cd_bf16)
#endif
