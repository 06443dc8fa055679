// Batch normalisation's per-channel pieces shared by norm.cu (batch norm) and conv_norm.cu
// (a 1x1 convolution fused with batch norm): block sums, the statistics and coefficients a
// channel's sums give, and the forward's stored value that the fused ReLU's mask recomputes.
#pragma once
#include "accum.cuh"

// Sum of v over the CTA, returned to every thread. blockDim.x: a multiple of 32, at most 1024.
// `sh` holds 32 values; the trailing barrier lets the caller reuse it at once.
template <typename A>
__device__ __forceinline__ A cd_block_sum(A v, A* sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = cd_warp_sum(v);
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = cd_warp_sum(lane < nw ? sh[lane] : A(0));
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

// The forward's value of element x of channel c before it is stored: (x - mean) * k (+ beta),
// k = inv_std * gamma. The product is rounded on its own (cd_mul_rn: no FMA with beta), so that
// the backward kernels recompute exactly the forward's value for the ReLU mask.
template <typename A>
__device__ __forceinline__ A cd_bn_value(A x, A mean, A k, A beta, int has_beta) {
    const A v = cd_mul_rn(x - mean, k);
    return has_beta ? v + beta : v;
}

// The fused ReLU's mask: whether the stored output T(v) is positive, which is where relu_bwd
// (act.cu) passes the gradient of relu(batch_norm(x)) computed in two ops.
template <typename T, typename A>
__device__ __forceinline__ bool cd_relu_pass(A v) {
    return cd_load(cd_store<T>(v)) > A(0);
}

// The training statistics of channel c from its mean and M2 = sum (x - mean)^2 over count
// values: stats[0][c] = mean, stats[1][c] = biased variance, stats[2][c] = 1 / sqrt(var + eps),
// and, if update, running_mean/var[c] = (1 - momentum) * run + momentum * (mean, var * unbias).
template <typename A>
__device__ __forceinline__ void cd_bn_stats_out(int c, int C, A mean, A m2, unsigned int count,
                                                A* stats, A* run_mean, A* run_var, double eps,
                                                double momentum, double unbias, int update) {
    const A var = m2 / A(count);
    stats[c] = mean;
    stats[C + c] = var;
    stats[2 * C + c] = cd_inv_std(var, eps);
    if (update) {
        run_mean[c] = run_mean[c] * A(1.0 - momentum) + A(momentum) * mean;
        run_var[c] = run_var[c] * A(1.0 - momentum) + A(momentum) * (var * A(unbias));
    }
}

// The backward outputs of channel c from sg = sum g and sgd = sum g * (x - mean) over its count
// values (sgx = sum g * xhat = sgd * s, xhat = (x - mean) * s): sg_out[c] = sg (beta's
// gradient), sgx_out[c] = sgx (gamma's), and the coefficients of gx = a * g + b * (x - mean) + d:
// with k = s * gamma, a = k and, in training (the batch statistics depend on x),
// b = -k * s * sgx / n, d = -k * sg / n; in eval b = d = 0.
// The sums are not written when sg_out is null; coef's rows are `rows` apart (C, or
// CD_BN_MERGE_MAX in shared memory).
template <typename A>
__device__ __forceinline__ void cd_bn_bwd_out(int c, int C, A sg, A sgd, unsigned int count,
                                              const A* s, const A* gamma, A* sg_out,
                                              A* sgx_out, A* coef,
                                              int rows, int has_gamma, int training) {
    const A inv = s[c];
    const A sgx = sgd * inv;
    const A k = has_gamma ? inv * gamma[c] : inv;
    if (sg_out) {
        sg_out[c] = sg;
        sgx_out[c] = sgx;
    }
    coef[c] = k;
    coef[rows + c] = training ? -k * inv * sgx / A(count) : A(0);
    coef[2 * rows + c] = training ? -k * sg / A(count) : A(0);
}
