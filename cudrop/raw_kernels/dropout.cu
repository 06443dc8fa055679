// Fused element dropout: draw (Philox), scale, and pack the keep bits in one pass; backward
// reads only the bits. x is viewed flat as mask row 0 of n columns (cudrop/masks.py), starting
// at column 4 * ctr0 (a data-parallel rank's elements of the global batch; 0 otherwise).
#include "philox.cuh"
#include "dtypes.cuh"

// Thread t owns elements 4t .. 4t + 3: one Philox call (counter t), one vector load and store.
// The four keep bits form a nibble; eight lanes OR their shifted nibbles into one 32-bit half of
// the little-endian uint64 bit array (word t / 8). Launch 16 * ceil(n / 64) threads so every
// bit word, padding included, is written. A non-null step_ptr (a device step) replaces the
// by-value step: read when the kernel runs, so a replayed CUDA graph draws the step the host
// wrote there last.
template <typename T>
__global__ void dropout_fwd(const T* __restrict__ x, T* __restrict__ y,
                            unsigned int* __restrict__ bits, long long n, long long n_words32,
                            unsigned int seed, unsigned int layer, unsigned int step,
                            const unsigned int* __restrict__ step_ptr,
                            unsigned int thresh, double scale, long long ctr0) {
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long i0 = 4 * t;
    // one uniform branch; every thread of a warp loads the same word (one broadcast load)
    const unsigned int step_now = step_ptr ? *step_ptr : step;
    const cd_u4 r = cd_philox((unsigned int)(t + ctr0), 0u, step_now, CD_TAG_ELEMENT, seed, layer);
    const bool k0 = i0 < n && r.x >= thresh, k1 = i0 + 1 < n && r.y >= thresh;
    const bool k2 = i0 + 2 < n && r.z >= thresh, k3 = i0 + 3 < n && r.w >= thresh;
    if (i0 + 3 < n) {
        const cd_vec4<T> in = reinterpret_cast<const cd_vec4<T>*>(x)[t];
        cd_vec4<T> out;
        out.v[0] = cd_scale_or_zero(in.v[0], scale, k0);
        out.v[1] = cd_scale_or_zero(in.v[1], scale, k1);
        out.v[2] = cd_scale_or_zero(in.v[2], scale, k2);
        out.v[3] = cd_scale_or_zero(in.v[3], scale, k3);
        reinterpret_cast<cd_vec4<T>*>(y)[t] = out;
    } else if (i0 < n) {
        const bool k[4] = {k0, k1, k2, k3};
        for (int j = 0; j < 4 && i0 + j < n; ++j) y[i0 + j] = cd_scale_or_zero(x[i0 + j], scale, k[j]);
    }
    unsigned int v = (unsigned int)(k0 | (k1 << 1) | (k2 << 2) | (k3 << 3)) << (4 * (threadIdx.x & 7));
    v |= __shfl_xor_sync(0xffffffffu, v, 1);
    v |= __shfl_xor_sync(0xffffffffu, v, 2);
    v |= __shfl_xor_sync(0xffffffffu, v, 4);
    if ((threadIdx.x & 7) == 0 && (t >> 3) < n_words32) bits[t >> 3] = v;
}

template <typename T>
__global__ void dropout_bwd(const T* __restrict__ gy, const unsigned int* __restrict__ bits,
                            T* __restrict__ gx, long long n, double scale) {
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long i0 = 4 * t;
    if (i0 >= n) return;
    const unsigned int nib = bits[t >> 3] >> (4 * (t & 7));
    if (i0 + 3 < n) {
        const cd_vec4<T> in = reinterpret_cast<const cd_vec4<T>*>(gy)[t];
        cd_vec4<T> out;
#pragma unroll
        for (int j = 0; j < 4; ++j) out.v[j] = cd_scale_or_zero(in.v[j], scale, (nib >> j) & 1u);
        reinterpret_cast<cd_vec4<T>*>(gx)[t] = out;
    } else {
        for (int j = 0; i0 + j < n; ++j) gx[i0 + j] = cd_scale_or_zero(gy[i0 + j], scale, (nib >> j) & 1u);
    }
}

#ifdef CUDROP_INSTANTIATE  // explicit instances for the nvcc compile check (NVRTC uses name_expressions)
#define CD_INST(T) \
    template __global__ void dropout_fwd<T>(const T*, T*, unsigned int*, long long, long long, \
        unsigned int, unsigned int, unsigned int, const unsigned int*, unsigned int, double, \
        long long); \
    template __global__ void dropout_bwd<T>(const T*, const unsigned int*, T*, long long, double);
CD_INST(float) CD_INST(double) CD_INST(cd_f16) CD_INST(cd_bf16)
#endif
