// The contract every block-sparse GEMM kernel follows (bsmm_simple.cu, bsmm_mma.cu,
// bsmm_sm90.cu, bsmm_tma.cu), so the Python dispatcher can swap them. (The Hopper kernels take
// ldc instead of ldcm/ldcn, a float alpha and the activation as a template argument.)
//
//   C(m, n) = act(alpha * sum_k A(m, k) B(k, n) + bias(n))
//   A(m, k) = A_KMAJ ? A[m*lda + k] : A[k*lda + m]      (K-major, or M-major = a transposed view)
//   B(k, n) = B_KMAJ ? B[n*ldb + k] : B[k*ldb + n]      (K-major = a transposed view, or N-major)
//   C(m, n) at C[m*ldcm + n*ldcn]
//
// Reduction pruning (dsd): with `count` set, row m sums only over the kept reduction blocks of
// its row block r = m / rblk: [j*kblk, min((j+1)*kblk, K)) for j in index[r*index_stride + i],
// i < count[r] (the ELL lists of masks.py). Dropped blocks are neither loaded nor multiplied.
// Output pruning (sdd): with `bits` set, C(m, n) is computed only where bit n / cblk of row block
// m / rblk is set (masks.py's packed bits) and is an exact 0 elsewhere.
#pragma once
#include "accum.cuh"

#define CD_BSMM_PARAMS(T)                                                                     \
    const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ C,                      \
        const T* __restrict__ bias, int M, int N, int K, long long lda, long long ldb,        \
        long long ldcm, long long ldcn, double alpha, int act, const int* __restrict__ count,  \
        const int* __restrict__ index, int index_stride, int rblk, int kblk,                  \
        const unsigned long long* __restrict__ bits, int bits_stride, int cblk

enum { CD_ACT_NONE = 0, CD_ACT_RELU = 1, CD_ACT_GELU = 2 };

template <typename F> __device__ __forceinline__ F cd_activate(F v, int act) {
    if (act == CD_ACT_RELU) return v > F(0) ? v : F(0);
    if (act == CD_ACT_GELU) return F(0.5) * v * (F(1) + erf(v * F(0.70710678118654752440)));
    return v;
}

// The reduction of one row block as a walk of `bk`-wide steps: a kept block of kblk columns is
// ceil(kblk / bk) steps, the last one cut at the block's end (block splitting: the GEMM's k-tile
// is independent of the mask's block). Without lists the walk is the dense [0, K).
struct cd_kwalk {
    const int* list;
    int steps, per_block, kblk, K, bk;

    __device__ __forceinline__ cd_kwalk(const int* count, const int* index, int index_stride,
                                        int r, int kblk_, int K_, int bk_) {
        K = K_; bk = bk_;
        int blocks = 1;
        list = nullptr;
        kblk = K_;
        if (count) { blocks = count[r]; list = index + (long long)r * index_stride; kblk = kblk_; }
        per_block = (kblk + bk - 1) / bk;
        steps = blocks * per_block;
    }
    // step s -> its columns [k0, kend), kend - k0 <= bk
    __device__ __forceinline__ void at(int s, int& k0, int& kend) const {
        const int b = s / per_block, sub = s - b * per_block;
        const long long start = list ? (long long)__ldg(list + b) * kblk : 0;
        k0 = (int)(start + (long long)sub * bk);
        kend = (int)min(min(start + kblk, (long long)K), (long long)k0 + bk);
    }
};

__device__ __forceinline__ bool cd_bit(const unsigned long long* bits, int bits_stride, int r,
                                       int c) {
    return (__ldg(bits + (long long)r * bits_stride + (c >> 6)) >> (c & 63)) & 1ull;
}

// Is any output column block in [n0, n1) of row block r kept? Collective over the CTA.
__device__ __forceinline__ bool cd_tile_kept(const unsigned long long* bits, int bits_stride,
                                             int r, int n0, int n1, int cblk) {
    if (!bits) return true;
    bool any = false;
    const int threads = blockDim.x * blockDim.y;
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    for (int c = n0 / cblk + tid; c <= (n1 - 1) / cblk; c += threads)
        any |= cd_bit(bits, bits_stride, r, c);
    return __syncthreads_or(any);
}

// The output tile of CTA blockIdx.x on a 1-D grid of ceil(M/BM) * ceil(N/BN) CTAs, in grouped
// order: consecutive CTAs walk 8 tile rows down one tile column before the next column, so CTAs
// that run together share their A rows and B columns in L2.
__device__ __forceinline__ void cd_grouped_tile(int M, int N, int BM, int BN, int& m0, int& n0) {
    const int grid_n = (N + BN - 1) / BN, grid_m = (M + BM - 1) / BM;
    const int width = 8 * grid_n, pid = blockIdx.x % width;
    const int first_m = blockIdx.x / width * 8, group = min(grid_m - first_m, 8);
    m0 = (first_m + pid % group) * BM;
    n0 = pid / group * BN;
}
