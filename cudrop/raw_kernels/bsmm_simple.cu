// The simple block-sparse GEMM (bsmm.cuh's contract) for every dtype: 16 x 16 output tiles
// through shared memory, accumulating in float (double for double). It is the GPU reference the
// tensor-core kernels are tested against, the float32/float64 path, and the fallback for shapes
// the fast kernels do not take. Launch: block (16, 16), grid (ceil(N/16), ceil(M/16)).
#include "bsmm.cuh"

template <typename T, bool A_KMAJ>
__device__ __forceinline__ T cd_a(const T* A, long long lda, int m, int k) {
    return A_KMAJ ? A[(long long)m * lda + k] : A[(long long)k * lda + m];
}

template <typename T, bool A_KMAJ, bool B_KMAJ>
__global__ void bsmm_simple(CD_BSMM_PARAMS(T)) {
    typedef typename cd_acc<T>::type F;
    __shared__ F As[16][17], Bs[16][17];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int m0 = blockIdx.y * 16, n0 = blockIdx.x * 16;
    const int m = m0 + ty, n = n0 + tx;
    // The tile walks one row block's list when its 16 rows share one; otherwise each thread
    // walks its own row (slow, but any block size is exact).
    const bool tiled = (!count && !bits) || rblk % 16 == 0;
    F acc = F(0);
    bool kept = true;
    if (tiled) {
        const int r = count || bits ? m0 / rblk : 0;
        if (!cd_tile_kept(bits, bits_stride, r, n0, min(n0 + 16, N), cblk)) {
            kept = false;
        } else {
            const cd_kwalk walk(count, index, index_stride, r, kblk, K, 16);
            for (int s = 0; s < walk.steps; ++s) {
                int k0, kend;
                walk.at(s, k0, kend);
                // The thread index runs along each operand's contiguous axis (coalesced).
                const int am = A_KMAJ ? ty : tx, ak = A_KMAJ ? tx : ty;
                As[am][ak] = (m0 + am < M && k0 + ak < kend)
                                 ? cd_load(cd_a<T, A_KMAJ>(A, lda, m0 + am, k0 + ak))
                                 : F(0);
                const int bk = B_KMAJ ? tx : ty, bn = B_KMAJ ? ty : tx;
                Bs[bk][bn] = (n0 + bn < N && k0 + bk < kend)
                                 ? cd_load(B_KMAJ ? B[(long long)(n0 + bn) * ldb + k0 + bk]
                                                  : B[(long long)(k0 + bk) * ldb + n0 + bn])
                                 : F(0);
                __syncthreads();
#pragma unroll
                for (int i = 0; i < 16; ++i) acc += As[ty][i] * Bs[i][tx];
                __syncthreads();
            }
            if (bits && n < N && m < M) kept = cd_bit(bits, bits_stride, r, n / cblk);
        }
    } else if (m < M && n < N) {
        const int r = m / rblk;
        kept = !bits || cd_bit(bits, bits_stride, r, n / cblk);
        if (kept) {
            const cd_kwalk walk(count, index, index_stride, r, kblk, K, 1 << 30);  // whole blocks
            for (int s = 0; s < walk.steps; ++s) {
                int k0, kend;
                walk.at(s, k0, kend);
                for (int k = k0; k < kend; ++k) {
                    const F b = cd_load(B_KMAJ ? B[(long long)n * ldb + k]
                                               : B[(long long)k * ldb + n]);
                    acc += cd_load(cd_a<T, A_KMAJ>(A, lda, m, k)) * b;
                }
            }
        }
    }
    if (m < M && n < N) {
        F v = F(0);
        if (kept) v = cd_activate(F(alpha) * acc + (bias ? cd_load(bias[n]) : F(0)), act);
        C[(long long)m * ldcm + (long long)n * ldcn] = cd_store<T>(v);
    }
}

#ifdef CUDROP_INSTANTIATE
#define CD_INST(T)                                                                 \
    template __global__ void bsmm_simple<T, true, false>(CD_BSMM_PARAMS(T));       \
    template __global__ void bsmm_simple<T, true, true>(CD_BSMM_PARAMS(T));        \
    template __global__ void bsmm_simple<T, false, false>(CD_BSMM_PARAMS(T));      \
    template __global__ void bsmm_simple<T, false, true>(CD_BSMM_PARAMS(T));
CD_INST(float)
CD_INST(double)
CD_INST(cd_f16)
CD_INST(cd_bf16)
#endif
