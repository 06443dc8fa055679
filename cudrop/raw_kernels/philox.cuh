// Philox4x32-10 and cudrop's mask coordinate map; the same function as cudrop/philox.py
// (tests compare the two bit for bit and against the Random123 known answers). __host__
// __device__ so that the CPU tests of the headers built on it (gyro.cuh) can run it.
#pragma once

#include "hostdev.cuh"

// philox.TAG_*: the tags are cudrop/philox.py's, in its order
#define CD_TAG_ELEMENT 0u
#define CD_TAG_BLOCK 1u
#define CD_TAG_GYRO 2u
#define CD_TAG_SCHEDULE 3u
#define CD_TAG_SLICE 5u

// The high word of a 32 x 32-bit product: the device's intrinsic, or the 64-bit product where
// the header is compiled for the host.
__host__ __device__ __forceinline__ unsigned int cd_umulhi(unsigned int a, unsigned int b) {
#ifdef __CUDA_ARCH__
    return __umulhi(a, b);
#else
    return (unsigned int)(((unsigned long long)a * b) >> 32);
#endif
}

struct cd_u4 { unsigned int x, y, z, w; };

__host__ __device__ __forceinline__ cd_u4 cd_philox(unsigned int c0, unsigned int c1,
                                                    unsigned int c2, unsigned int c3,
                                                    unsigned int k0, unsigned int k1) {
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        if (r) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }
        const unsigned int hi0 = cd_umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        const unsigned int hi1 = cd_umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
    }
    return {c0, c1, c2, c3};
}

__host__ __device__ __forceinline__ unsigned int cd_word(const cd_u4& v, int j) {
    return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

// The word at mask coordinate (row, col): counter (col / 4, row, step, tag), key (seed, layer),
// word col % 4 -- one call serves four consecutive columns.
__host__ __device__ __forceinline__ unsigned int cd_mask_word(
        unsigned int seed, unsigned int layer, unsigned int step, unsigned int tag,
        unsigned int row, unsigned long long col) {
    return cd_word(cd_philox((unsigned int)(col >> 2), row, step, tag, seed, layer),
                   (int)(col & 3ull));
}
