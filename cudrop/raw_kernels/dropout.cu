// Fused element dropout: draw (Philox), scale, and pack the keep bits in one pass; backward
// reads only the bits. x is viewed flat as mask row 0 of n columns (cudrop/masks.py).
#include "philox.cuh"
#include "dtypes.cuh"

// Each warp owns 128 consecutive elements; lane l makes one Philox call and uses its word j for
// element 32 j + l, so __ballot_sync over word j is exactly 32-bit half-word (4 chunk + j) of the
// little-endian uint64 bit array.
template <typename T>
__global__ void dropout_fwd(const T* __restrict__ x, T* __restrict__ y,
                            unsigned int* __restrict__ bits, long long n, long long n_words32,
                            unsigned int seed, unsigned int layer, unsigned int step,
                            unsigned int thresh, double scale) {
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const long long base = warp * 128;
    if (base >= n) return;  // uniform across the warp: base depends on the warp only
    const cd_u4 r = cd_philox((unsigned int)(warp * 32 + lane), 0u, step, CD_TAG_ELEMENT, seed, layer);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const long long i = base + 32 * j + lane;
        const bool keep = i < n && cd_word(r, j) >= thresh;
        if (i < n) y[i] = cd_scale_or_zero(x[i], scale, keep);
        const unsigned int b = __ballot_sync(0xffffffffu, keep);
        const long long w = warp * 4 + j;
        if (lane == 0 && w < n_words32) bits[w] = b;
    }
}

template <typename T>
__global__ void dropout_bwd(const T* __restrict__ gy, const unsigned int* __restrict__ bits,
                            T* __restrict__ gx, long long n, double scale) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const bool keep = (bits[i >> 5] >> (i & 31)) & 1u;
    gx[i] = cd_scale_or_zero(gy[i], scale, keep);
}

#ifdef CUDROP_INSTANTIATE  // explicit instances for the nvcc compile check (NVRTC uses name_expressions)
#define CD_INST(T) \
    template __global__ void dropout_fwd<T>(const T*, T*, unsigned int*, long long, long long, \
        unsigned int, unsigned int, unsigned int, unsigned int, double); \
    template __global__ void dropout_bwd<T>(const T*, const unsigned int*, T*, long long, double);
CD_INST(float) CD_INST(double) CD_INST(cd_f16) CD_INST(cd_bf16)
#endif
