// Batch normalisation over axis 1 of a contiguous (N, C, P) array (P = product of the trailing
// axes, 1 for (N, C) input). Two launches per direction: a per-channel reduction (one CTA per
// channel, so the channel's statistics and the running-stat update need no second pass or
// atomics, and the sums are deterministic) and one elementwise pass.
#include "accum.cuh"

// Sum of v over the CTA, returned to every thread. blockDim.x: a multiple of 32, at most 1024.
// `sh` holds 32 values; the trailing barrier lets the caller reuse it at once.
template <typename A>
__device__ __forceinline__ A cd_block_sum(A v, A* sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : A(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    return v;
}

// Explicit sqrtf / sqrt: no reliance on C++ math overloads under NVRTC.
__device__ __forceinline__ float cd_inv_std(float var, double eps) {
    return 1.0f / sqrtf(var + (float)eps);
}
__device__ __forceinline__ double cd_inv_std(double var, double eps) {
    return 1.0 / sqrt(var + eps);
}

// Element j of channel c, j in [0, N*P): j = n * P + p.
__device__ __forceinline__ long long cd_offset(unsigned int j, unsigned int P, int C, int c) {
    const unsigned int n = j / P;
    return ((long long)n * C + c) * P + (j - n * P);
}

// Channel of flat element i of (N, C, P); 32-bit division whenever the size allows.
__device__ __forceinline__ int cd_channel(long long i, long long total, int C, int P) {
    if (total <= 0xffffffffLL) return (int)(((unsigned int)i / (unsigned int)P) % (unsigned int)C);
    return (int)((i / P) % C);
}

// Training statistics, CTA c for channel c, two passes over the channel (the second from L2):
// mean, then the mean of squared deviations, both accumulated in cd_acc<T>. Writes
// stats[0][c] = mean, stats[1][c] = biased variance, stats[2][c] = 1 / sqrt(var + eps), and, if
// update, running_mean/var[c] = (1 - momentum) * run + momentum * (mean, var * unbias).
template <typename T>
__global__ void bn_stats(const T* __restrict__ x, typename cd_acc<T>::type* __restrict__ stats,
                         typename cd_acc<T>::type* __restrict__ run_mean,
                         typename cd_acc<T>::type* __restrict__ run_var, int N, int C, int P,
                         double eps, double momentum, double unbias, int update) {
    typedef typename cd_acc<T>::type A;
    __shared__ A sh[32];
    const int c = blockIdx.x;
    const unsigned int count = (unsigned int)N * (unsigned int)P;
    A s = 0;
#pragma unroll 4
    for (unsigned int j = threadIdx.x; j < count; j += blockDim.x)
        s += cd_load(x[cd_offset(j, P, C, c)]);
    const A mean = cd_block_sum(s, sh) / A(count);
    A s2 = 0;
#pragma unroll 4
    for (unsigned int j = threadIdx.x; j < count; j += blockDim.x) {
        const A d = cd_load(x[cd_offset(j, P, C, c)]) - mean;
        s2 += d * d;
    }
    const A var = cd_block_sum(s2, sh) / A(count);
    if (threadIdx.x == 0) {
        stats[c] = mean;
        stats[C + c] = var;
        stats[2 * C + c] = cd_inv_std(var, eps);
        if (update) {
            run_mean[c] = run_mean[c] * A(1.0 - momentum) + A(momentum) * mean;
            run_var[c] = run_var[c] * A(1.0 - momentum) + A(momentum) * (var * A(unbias));
        }
    }
}

// y = (x - mean[c]) * s[c] * gamma[c] + beta[c], with s = inv_std, or 1 / sqrt(s + eps) when
// from_var (eval: s is the running variance). When from_var, the threads i < C also write the
// per-channel mean and inverse std to saved[0][i], saved[1][i] for backward (private copies, so a
// later update of the running statistics cannot change the gradient).
template <typename T>
__global__ void bn_fwd(const T* __restrict__ x, T* __restrict__ y,
                       const typename cd_acc<T>::type* __restrict__ mean,
                       const typename cd_acc<T>::type* __restrict__ s,
                       const typename cd_acc<T>::type* __restrict__ gamma,
                       const typename cd_acc<T>::type* __restrict__ beta,
                       typename cd_acc<T>::type* __restrict__ saved, long long total, int C,
                       int P, double eps, int from_var, int has_gamma, int has_beta) {
    typedef typename cd_acc<T>::type A;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const int c = cd_channel(i, total, C, P);
    A k = from_var ? cd_inv_std(s[c], eps) : s[c];
    if (from_var && i < C) {
        saved[i] = mean[i];
        saved[C + i] = cd_inv_std(s[i], eps);
    }
    if (has_gamma) k *= gamma[c];
    A v = (cd_load(x[i]) - mean[c]) * k;
    if (has_beta) v += beta[c];
    y[i] = cd_store<T>(v);
}

// Backward sums, CTA c for channel c: sg = sum g, sgx = sum g * xhat with xhat = (x - mean) * s.
// Writes sums[0][c] = sg (beta's gradient), sums[1][c] = sgx (gamma's), and the coefficients of
// gx = a * g + b * (x - mean) + d: with k = s * gamma, a = k and, in training (the batch
// statistics depend on x), b = -k * s * sgx / n, d = -k * sg / n; in eval b = d = 0.
template <typename T>
__global__ void bn_bwd_sums(const T* __restrict__ g, const T* __restrict__ x,
                            const typename cd_acc<T>::type* __restrict__ mean,
                            const typename cd_acc<T>::type* __restrict__ s,
                            const typename cd_acc<T>::type* __restrict__ gamma,
                            typename cd_acc<T>::type* __restrict__ sums,
                            typename cd_acc<T>::type* __restrict__ coef, int N, int C, int P,
                            int has_gamma, int training) {
    typedef typename cd_acc<T>::type A;
    __shared__ A sh[32];
    const int c = blockIdx.x;
    const unsigned int count = (unsigned int)N * (unsigned int)P;
    const A m = mean[c];
    A sg = 0, sgd = 0;
#pragma unroll 4
    for (unsigned int j = threadIdx.x; j < count; j += blockDim.x) {
        const long long o = cd_offset(j, P, C, c);
        const A gv = cd_load(g[o]);
        sg += gv;
        sgd += gv * (cd_load(x[o]) - m);
    }
    sg = cd_block_sum(sg, sh);
    sgd = cd_block_sum(sgd, sh);
    if (threadIdx.x == 0) {
        const A inv = s[c];
        const A sgx = sgd * inv;
        const A k = has_gamma ? inv * gamma[c] : inv;
        sums[c] = sg;
        sums[C + c] = sgx;
        coef[c] = k;
        coef[C + c] = training ? -k * inv * sgx / A(count) : A(0);
        coef[2 * C + c] = training ? -k * sg / A(count) : A(0);
    }
}

// gx = a[c] * g + b[c] * (x - mean[c]) + d[c], coefficients from bn_bwd_sums.
template <typename T>
__global__ void bn_bwd_apply(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ gx,
                             const typename cd_acc<T>::type* __restrict__ mean,
                             const typename cd_acc<T>::type* __restrict__ coef, long long total,
                             int C, int P) {
    typedef typename cd_acc<T>::type A;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const int c = cd_channel(i, total, C, P);
    const A v = coef[c] * cd_load(g[i]) + coef[C + c] * (cd_load(x[i]) - mean[c]) + coef[2 * C + c];
    gx[i] = cd_store<T>(v);
}

#ifdef CUDROP_INSTANTIATE  // explicit instances for the nvcc compile check (NVRTC uses name_expressions)
#define CD_INST(T) \
    template __global__ void bn_stats<T>(const T*, cd_acc<T>::type*, cd_acc<T>::type*, \
        cd_acc<T>::type*, int, int, int, double, double, double, int); \
    template __global__ void bn_fwd<T>(const T*, T*, const cd_acc<T>::type*, \
        const cd_acc<T>::type*, const cd_acc<T>::type*, const cd_acc<T>::type*, \
        cd_acc<T>::type*, long long, int, int, double, int, int, int); \
    template __global__ void bn_bwd_sums<T>(const T*, const T*, const cd_acc<T>::type*, \
        const cd_acc<T>::type*, const cd_acc<T>::type*, cd_acc<T>::type*, cd_acc<T>::type*, \
        int, int, int, int, int); \
    template __global__ void bn_bwd_apply<T>(const T*, const T*, T*, const cd_acc<T>::type*, \
        const cd_acc<T>::type*, long long, int, int);
CD_INST(float) CD_INST(double) CD_INST(cd_f16) CD_INST(cd_bf16)
#endif
