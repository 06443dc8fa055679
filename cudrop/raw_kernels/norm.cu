// Batch normalisation over axis 1 of a contiguous (N, C, P) array (P = product of the trailing
// axes, 1 for (N, C) input). Each direction is a per-channel reduction and one elementwise pass.
// The reductions split channel c's N samples over S CTAs (grid (C, S), S = gridDim.y, chosen by
// the host): one CTA per channel left most of the GPU idle on small-channel layers (ResNet-56 on
// CIFAR: C = 16..64 on 132 SMs; an H200 profile of its step showed ~33 us per call for 8 MB
// that HBM reads in ~3-4 us). Each CTA writes its partial results to a small workspace, and
// every CTA of the elementwise pass that follows (bn_fwd, bn_bwd_apply) merges them in a fixed
// order into shared memory, so the results stay deterministic without atomics and without a
// merge launch; its CTA 0 writes the merged statistics (sums). With S = 1 the reduction kernel
// finishes the channel itself.
// A ReLU can be fused (relu = 1): bn_fwd stores relu(y), and the backward kernels take the
// ReLU's gradient mask from the forward's value, recomputed from x and the per-channel
// statistics (cd_bn_value), instead of reading a saved output: no extra array is kept alive
// and each backward pass reads g and x only, as without the ReLU. (With add + ReLU fused too,
// ResNet-56's step kernels went 12.91 -> 12.31 ms on the H200; the two not measured apart.)
#include "norm.cuh"

// Element j of channel c, j in [0, N*P): j = n * P + p, n counted from the sample that the
// caller's pointer starts at (a split's first sample).
__device__ __forceinline__ long long cd_offset(unsigned int j, unsigned int P, int C, int c) {
    const unsigned int n = j / P;
    return ((long long)n * C + c) * P + (j - n * P);
}

// Channel of flat element i of (N, C, P); 32-bit division whenever the size allows.
__device__ __forceinline__ int cd_channel(long long i, long long total, int C, int P) {
    if (total <= 0xffffffffLL) return (int)(((unsigned int)i / (unsigned int)P) % (unsigned int)C);
    return (int)((i / P) % C);
}

// First sample of split s of N samples in S parts: split s owns [cd_split(s), cd_split(s + 1)),
// at least one sample each when S <= N (the host caps S at N).
__device__ __forceinline__ int cd_split(int s, int N, int S) {
    return (int)((long long)s * N / S);
}

// Values of channel c in split s: (n1 - n0) * P, below 2^31 (the host checks N * P).
__device__ __forceinline__ unsigned int cd_split_count(int s, int N, int S, int P) {
    return (unsigned int)(cd_split(s + 1, N, S) - cd_split(s, N, S)) * (unsigned int)P;
}

// The vector walks: V = 16 / sizeof(T) values an access where every channel's run of P values
// starts 16-byte aligned (P % V == 0 and aligned arrays; one uniform test per kernel, the scalar
// walk otherwise), so a vector never straddles two channels. Scalar loads with a division per
// value ran ResNet-56's batch norms at 0.6-1.5 TB/s on the H200 (profile_step.py: 2.0 ms of a
// 12.0 ms fp32 step in the four kernels and their merges).
template <typename T> struct cd_bn_width { static constexpr int V = 16 / sizeof(T); };

template <typename T>
__device__ __forceinline__ bool cd_bn_vectors(int P, const void* a, const void* b, const void* c) {
    return P % cd_bn_width<T>::V == 0 &&
           (((size_t)a | (size_t)b | (size_t)c) % 16) == 0;
}

// Calls f(offset of a vector's first value) for each V-value vector of channel c in a split
// (count values, samples of P values); each thread takes every blockDim.x-th vector, one
// division per vector.
template <typename T, int V, typename F>
__device__ __forceinline__ void cd_bn_channel_walk(unsigned int count, int P, int C, int c,
                                                   F&& f) {
    const unsigned int pv = (unsigned int)P / V, nv = count / V;
#pragma unroll 2
    for (unsigned int j = threadIdx.x; j < nv; j += blockDim.x) {
        const unsigned int n = j / pv;
        f(((long long)n * C + c) * P + (long long)(j - n * pv) * V);
    }
}

// Training statistics, CTA (c, s) for split s of channel c (samples [n0, n1), each a contiguous
// run of P values, walked as one flat index so that a warp's loads are consecutive addresses):
// two passes over the split, the second from L1/L2, giving its mean and M2 = sum (x - mean)^2,
// both accumulated in cd_acc<T> (deviations from the split's own mean: no cancellation of
// sum x^2 - n mean^2, and no division per value as a running Welford update has). With
// S = gridDim.y > 1, part[0][c][s] = mean and part[1][c][s] = M2 (layout (2, C, S): a merging
// channel's splits are consecutive addresses) for bn_fwd to merge; with S = 1 the CTA
// writes the statistics itself (cd_bn_stats_out).
template <typename T>
__global__ void bn_stats(const T* __restrict__ x, typename cd_acc<T>::type* __restrict__ part,
                         typename cd_acc<T>::type* __restrict__ stats,
                         typename cd_acc<T>::type* __restrict__ run_mean,
                         typename cd_acc<T>::type* __restrict__ run_var, int N, int C, int P,
                         double eps, double momentum, double unbias, int update) {
    typedef typename cd_acc<T>::type A;
    __shared__ A sh[32];
    const int c = blockIdx.x, s = blockIdx.y, S = gridDim.y;
    const unsigned int count = cd_split_count(s, N, S, P);
    const T* __restrict__ xs = x + (long long)cd_split(s, N, S) * C * P;  // sample n0
    A sum = 0, s2 = 0;
    constexpr int V = cd_bn_width<T>::V;
    if (cd_bn_vectors<T>(P, x, x, x)) {
        cd_bn_channel_walk<T, V>(count, P, C, c, [&](long long o) {
            const cd_vec<T, V> v = *reinterpret_cast<const cd_vec<T, V>*>(xs + o);
#pragma unroll
            for (int k = 0; k < V; ++k) sum += cd_load(v.v[k]);
        });
    } else {
#pragma unroll 4
        for (unsigned int j = threadIdx.x; j < count; j += blockDim.x)
            sum += cd_load(xs[cd_offset(j, P, C, c)]);
    }
    const A mean = cd_block_sum(sum, sh) / A(count);
    if (cd_bn_vectors<T>(P, x, x, x)) {
        cd_bn_channel_walk<T, V>(count, P, C, c, [&](long long o) {
            const cd_vec<T, V> v = *reinterpret_cast<const cd_vec<T, V>*>(xs + o);
#pragma unroll
            for (int k = 0; k < V; ++k) {
                const A d = cd_load(v.v[k]) - mean;
                s2 += d * d;
            }
        });
    } else {
#pragma unroll 4
        for (unsigned int j = threadIdx.x; j < count; j += blockDim.x) {
            const A d = cd_load(xs[cd_offset(j, P, C, c)]) - mean;
            s2 += d * d;
        }
    }
    const A m2 = cd_block_sum(s2, sh);
    if (threadIdx.x == 0) {
        if (S == 1) {
            cd_bn_stats_out(c, C, mean, m2, count, stats, run_mean, run_var, eps, momentum,
                            unbias, update);
        } else {
            part[(long long)c * S + s] = mean;
            part[(long long)(C + c) * S + s] = m2;
        }
    }
}

// Channel c's statistics from bn_stats's S partials: Chan et al.'s parallel-variance formula in
// its S-way form, mean = sum_s n_s mean_s / n and M2 = sum_s (M2_s + n_s (mean_s - mean)^2)
// (every term non-negative: no cancellation), summed over s in order, so every CTA of bn_fwd
// that merges channel c gets the same bits. A separate merge kernel each way (one warp per
// channel) cost ~2 us a launch: 0.34 ms of kernels in the ResNet-56 step with depth dropout's
// shortcuts (H200, profile_step.py).
template <typename A>
__device__ __forceinline__ void cd_bn_merge_stats(const A* part, int c, int N, int C, int P,
                                                  int S, A& mean, A& m2) {
    const A* pmean = part + c * S;
    const A* pm2 = part + (C + c) * S;
    A sum = 0;
    for (int k = 0; k < S; ++k) sum += A(cd_split_count(k, N, S, P)) * pmean[k];
    mean = sum / A((unsigned int)N * (unsigned int)P);
    A acc = 0;
    for (int k = 0; k < S; ++k) {
        const A d = pmean[k] - mean;
        acc += pm2[k] + A(cd_split_count(k, N, S, P)) * d * d;
    }
    m2 = acc;
}

// A split reduction's (2, C, S) partials copied to shared memory, one load a thread (the merge
// then reads them there instead of waiting on L2 S times in a row).
template <typename A>
__device__ __forceinline__ void cd_bn_stage_partials(const A* __restrict__ part, A* sh, int n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) sh[i] = part[i];
    __syncthreads();
}

// The most channels (C) and partials (C * S) a CTA merges in shared memory; the host splits
// the reductions (S > 1) only within them.
#define CD_BN_MERGE_MAX 512
#define CD_BN_PART_MAX 1024

// y = (x - mean[c]) * s[c] * gamma[c] + beta[c], with s = inv_std, or 1 / sqrt(s + eps) when
// from_var (eval: s is the running variance); y = max(y, 0) when relu (NaN stays NaN, as
// cupy.maximum keeps it); a grid-stride walk, V values an access where cd_bn_vectors allows.
// When from_var, the first C threads of the grid also write the per-channel mean and inverse std
// to saved[0][i], saved[1][i] for backward (private copies, so a later update of the running
// statistics cannot change the gradient). S > 1 (training after a split bn_stats): mean and s
// are not read; each CTA merges bn_stats's partials `part` (cd_bn_merge_stats) and CTA 0 writes
// the statistics `stats` and updates the running ones, as bn_stats does for S = 1.
template <typename T>
__global__ void bn_fwd(const T* __restrict__ x, T* __restrict__ y,
                       const typename cd_acc<T>::type* __restrict__ mean,
                       const typename cd_acc<T>::type* __restrict__ s,
                       const typename cd_acc<T>::type* __restrict__ gamma,
                       const typename cd_acc<T>::type* __restrict__ beta,
                       typename cd_acc<T>::type* __restrict__ saved, long long total, int C,
                       int P, double eps, int from_var, int has_gamma, int has_beta, int relu,
                       const typename cd_acc<T>::type* __restrict__ part, int N, int S,
                       typename cd_acc<T>::type* __restrict__ stats,
                       typename cd_acc<T>::type* __restrict__ run_mean,
                       typename cd_acc<T>::type* __restrict__ run_var, double momentum,
                       double unbias, int update) {
    typedef typename cd_acc<T>::type A;
    __shared__ A sh_mean[CD_BN_MERGE_MAX], sh_k[CD_BN_MERGE_MAX], sh_part[2 * CD_BN_PART_MAX];
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    if (from_var) {
        for (long long i = tid; i < C; i += stride) {
            saved[i] = mean[i];
            saved[C + i] = cd_inv_std(s[i], eps);
        }
    }
    const bool merged = S > 1;  // every CTA merges the partials; CTA 0 writes the statistics
    if (merged) {
        cd_bn_stage_partials(part, sh_part, 2 * C * S);
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            A m, m2;
            cd_bn_merge_stats(sh_part, c, N, C, P, S, m, m2);
            const A inv = cd_inv_std(m2 / A((unsigned int)N * (unsigned int)P), eps);
            sh_mean[c] = m;
            sh_k[c] = has_gamma ? inv * gamma[c] : inv;
            if (blockIdx.x == 0)
                cd_bn_stats_out(c, C, m, m2, (unsigned int)N * (unsigned int)P, stats,
                                run_mean, run_var, eps, momentum, unbias, update);
        }
        __syncthreads();
    }
    // one channel's coefficients for each access (its V values share the channel)
    auto value = [&](int c, A xv) {
        A k, m;
        if (merged) {
            k = sh_k[c];
            m = sh_mean[c];
        } else {
            k = from_var ? cd_inv_std(s[c], eps) : s[c];
            if (has_gamma) k *= gamma[c];
            m = mean[c];
        }
        A v = cd_bn_value(xv, m, k, has_beta ? beta[c] : A(0), has_beta);
        return relu && v < A(0) ? A(0) : v;
    };
    constexpr int V = cd_bn_width<T>::V;
    if (cd_bn_vectors<T>(P, x, y, y)) {
        for (long long i = tid; i < total / V; i += stride) {
            const int c = cd_channel(i * V, total, C, P);
            cd_vec<T, V> v = reinterpret_cast<const cd_vec<T, V>*>(x)[i];
#pragma unroll
            for (int e = 0; e < V; ++e) v.v[e] = cd_store<T>(value(c, cd_load(v.v[e])));
            reinterpret_cast<cd_vec<T, V>*>(y)[i] = v;
        }
    } else {
        for (long long i = tid; i < total; i += stride)
            y[i] = cd_store<T>(value(cd_channel(i, total, C, P), cd_load(x[i])));
    }
}

// Backward sums, CTA (c, s) for split s of channel c (the walk of bn_stats): sg = sum g and
// sgd = sum g * (x - mean) over the split, g masked by the fused ReLU when relu (zero where the
// forward's output was not positive; cd_bn_value with k = s * gamma, the forward's product).
// With S = gridDim.y > 1, part[0][c][s] = sg and part[1][c][s] = sgd for bn_bwd_apply; with
// S = 1 the CTA writes the outputs itself (cd_bn_bwd_out).
template <typename T>
__global__ void bn_bwd_sums(const T* __restrict__ g, const T* __restrict__ x,
                            const typename cd_acc<T>::type* __restrict__ mean,
                            const typename cd_acc<T>::type* __restrict__ s,
                            const typename cd_acc<T>::type* __restrict__ gamma,
                            const typename cd_acc<T>::type* __restrict__ beta,
                            typename cd_acc<T>::type* __restrict__ part,
                            typename cd_acc<T>::type* __restrict__ sg_out,
                            typename cd_acc<T>::type* __restrict__ sgx_out,
                            typename cd_acc<T>::type* __restrict__ coef, int N, int C, int P,
                            int has_gamma, int training, int has_beta, int relu) {
    typedef typename cd_acc<T>::type A;
    __shared__ A sh[32];
    const int c = blockIdx.x, sp = blockIdx.y, S = gridDim.y;
    const unsigned int count = cd_split_count(sp, N, S, P);
    const long long base = (long long)cd_split(sp, N, S) * C * P;  // sample n0
    const T* __restrict__ gs = g + base;
    const T* __restrict__ xs = x + base;
    const A m = mean[c];
    const A k = has_gamma ? s[c] * gamma[c] : s[c];  // only read when relu
    const A b = has_beta ? beta[c] : A(0);
    A sg = 0, sgd = 0;
    auto add = [&](A xv, A gv) {
        if (relu && !cd_relu_pass<T>(cd_bn_value(xv, m, k, b, has_beta))) gv = A(0);
        sg += gv;
        sgd += gv * (xv - m);
    };
    constexpr int V = cd_bn_width<T>::V;
    if (cd_bn_vectors<T>(P, g, x, x)) {
        cd_bn_channel_walk<T, V>(count, P, C, c, [&](long long o) {
            const cd_vec<T, V> xv = *reinterpret_cast<const cd_vec<T, V>*>(xs + o);
            const cd_vec<T, V> gv = *reinterpret_cast<const cd_vec<T, V>*>(gs + o);
#pragma unroll
            for (int e = 0; e < V; ++e) add(cd_load(xv.v[e]), cd_load(gv.v[e]));
        });
    } else {
#pragma unroll 4
        for (unsigned int j = threadIdx.x; j < count; j += blockDim.x) {
            const long long o = cd_offset(j, P, C, c);
            add(cd_load(xs[o]), cd_load(gs[o]));
        }
    }
    sg = cd_block_sum(sg, sh);
    sgd = cd_block_sum(sgd, sh);
    if (threadIdx.x == 0) {
        if (S == 1) {
            cd_bn_bwd_out(c, C, sg, sgd, count, s, gamma, sg_out, sgx_out, coef, C, has_gamma,
                          training);
        } else {
            part[(long long)c * S + sp] = sg;
            part[(long long)(C + c) * S + sp] = sgd;
        }
    }
}

// gx = a[c] * g + b[c] * (x - mean[c]) + d[c], g masked by the fused ReLU when relu (as in
// bn_bwd_sums; a[c] = k, the forward's product). The coefficients come from bn_bwd_sums for
// S = 1; for S > 1 each CTA sums its partials `part` in order and computes them
// (cd_bn_bwd_out), and CTA 0 writes the sums sg_out / sgx_out.
template <typename T>
__global__ void bn_bwd_apply(const T* __restrict__ g, const T* __restrict__ x, T* __restrict__ gx,
                             const typename cd_acc<T>::type* __restrict__ mean,
                             const typename cd_acc<T>::type* __restrict__ coef,
                             const typename cd_acc<T>::type* __restrict__ beta, long long total,
                             int C, int P, int has_beta, int relu,
                             const typename cd_acc<T>::type* __restrict__ part, int N, int S,
                             const typename cd_acc<T>::type* __restrict__ s,
                             const typename cd_acc<T>::type* __restrict__ gamma,
                             typename cd_acc<T>::type* __restrict__ sg_out,
                             typename cd_acc<T>::type* __restrict__ sgx_out, int has_gamma,
                             int training) {
    typedef typename cd_acc<T>::type A;
    __shared__ A sh_coef[3 * CD_BN_MERGE_MAX], sh_part[2 * CD_BN_PART_MAX];
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    // S > 1: every CTA sums bn_bwd_sums's partials of each channel in order (the same bits in
    // each) into its own coefficients; CTA 0 writes the sums (beta's and gamma's gradients)
    const A* cf = coef;
    int cs = C;
    if (S > 1) {
        cd_bn_stage_partials(part, sh_part, 2 * C * S);
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            A sg = 0, sgd = 0;
            for (int k = 0; k < S; ++k) {
                sg += sh_part[c * S + k];
                sgd += sh_part[(C + c) * S + k];
            }
            cd_bn_bwd_out(c, C, sg, sgd, (unsigned int)N * (unsigned int)P, s, gamma,
                          blockIdx.x == 0 ? sg_out : nullptr, sgx_out, sh_coef,
                          CD_BN_MERGE_MAX, has_gamma, training);
        }
        __syncthreads();
        cf = sh_coef;
        cs = CD_BN_MERGE_MAX;
    }
    auto value = [&](int c, A xv, A gv) {
        const A m = mean[c];
        if (relu && !cd_relu_pass<T>(cd_bn_value(xv, m, cf[c], has_beta ? beta[c] : A(0),
                                                 has_beta)))
            gv = A(0);
        return cf[c] * gv + cf[cs + c] * (xv - m) + cf[2 * cs + c];
    };
    constexpr int V = cd_bn_width<T>::V;
    if (cd_bn_vectors<T>(P, g, x, gx)) {
        for (long long i = tid; i < total / V; i += stride) {
            const int c = cd_channel(i * V, total, C, P);
            const cd_vec<T, V> xv = reinterpret_cast<const cd_vec<T, V>*>(x)[i];
            cd_vec<T, V> gv = reinterpret_cast<const cd_vec<T, V>*>(g)[i];
#pragma unroll
            for (int e = 0; e < V; ++e)
                gv.v[e] = cd_store<T>(value(c, cd_load(xv.v[e]), cd_load(gv.v[e])));
            reinterpret_cast<cd_vec<T, V>*>(gx)[i] = gv;
        }
    } else {
        for (long long i = tid; i < total; i += stride)
            gx[i] = cd_store<T>(value(cd_channel(i, total, C, P), cd_load(x[i]), cd_load(g[i])));
    }
}

#ifdef CUDROP_INSTANTIATE  // explicit instances for the nvcc compile check (NVRTC uses name_expressions)
#define CD_INST(T) \
    template __global__ void bn_stats<T>(const T*, cd_acc<T>::type*, cd_acc<T>::type*, \
        cd_acc<T>::type*, cd_acc<T>::type*, int, int, int, double, double, double, int); \
    template __global__ void bn_fwd<T>(const T*, T*, const cd_acc<T>::type*, \
        const cd_acc<T>::type*, const cd_acc<T>::type*, const cd_acc<T>::type*, \
        cd_acc<T>::type*, long long, int, int, double, int, int, int, int, \
        const cd_acc<T>::type*, int, int, cd_acc<T>::type*, cd_acc<T>::type*, \
        cd_acc<T>::type*, double, double, int); \
    template __global__ void bn_bwd_sums<T>(const T*, const T*, const cd_acc<T>::type*, \
        const cd_acc<T>::type*, const cd_acc<T>::type*, const cd_acc<T>::type*, \
        cd_acc<T>::type*, cd_acc<T>::type*, cd_acc<T>::type*, cd_acc<T>::type*, int, int, int, \
        int, int, int, int); \
    template __global__ void bn_bwd_apply<T>(const T*, const T*, T*, const cd_acc<T>::type*, \
        const cd_acc<T>::type*, const cd_acc<T>::type*, long long, int, int, int, int, \
        const cd_acc<T>::type*, int, int, const cd_acc<T>::type*, const cd_acc<T>::type*, \
        cd_acc<T>::type*, cd_acc<T>::type*, int, int);
CD_INST(float) CD_INST(double) CD_INST(cd_f16) CD_INST(cd_bf16)
#endif
