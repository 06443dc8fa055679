// A 1x1, stride-1 convolution fused with training-mode batch norm (and its ReLU):
// z = act(BN(y)), y[n, o, p] = sum_c w[o, c] x[n, c, p], on contiguous (N, C, P) input, P the
// pixels of a sample. y is never stored: every kernel recomputes it from x for a tile of TP
// pixels of one sample (x's tile and w in shared memory, fp32 FMAs in a fixed order, so every
// kernel gets the same bits of y and the ReLU mask of backward is the forward's). Depth
// dropout's trainable shortcut is this op on every residual unit: as a GEMM, BN and ReLU it was
// three kernels forward and five backward that wrote and reread y and its gradient (1.86 ms of
// a 12 ms ResNet-56 step's kernels on the H200 for 27 shortcuts; profile_step.py).
//
// Forward: conv_bn_stats (CTA s of S: a run of tiles; per channel the run's mean and M2, each
// tile's two-pass statistics merged in with Chan et al.'s formula) -> conv_bn_merge (grid O:
// the S partials in a fixed order; the batch statistics, the running ones updated) ->
// conv_bn_fwd (z). Backward: conv_bn_bwd_sums (per channel sum g and sum g * (y - mean), g
// masked by the ReLU) -> conv_bn_bwd_coef (grid O: the sums, gamma's and beta's gradients and
// gy = a g + b (y - mean) + d's coefficients) -> conv_bn_bwd_apply (gx = w^T gy per tile, and
// each CTA's partial sum of gy x^T, which the host sums into w's gradient). Deterministic: no
// atomics, every reduction in a fixed order.
//
// Thread layout (256 threads): lane group og = t / 8 owns output channels og + 32 r (r < R),
// pg = t % 8 the tile's pixels 4 pg .. 4 pg + 3; a channel's values of a tile live in one
// group of 8 lanes, reduced by xor shuffles.
#include "norm.cuh"

// The most channels (C and O) the kernels take (the host checks; a double tile stays within
// 48 KB of static shared memory), the tile's pixels, its shared-memory row stride (odd: the
// weight-gradient loop reads 16 rows at once) and the output channels a thread owns.
template <typename A> struct cd_cbn {
    static constexpr int MAXC = sizeof(A) == 8 ? 32 : 64;
    static constexpr int TP = 32, TS = TP + 1, WS = MAXC + 1, R = MAXC / 32;
};

__device__ __forceinline__ float cd_fma(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double cd_fma(double a, double b, double c) { return __fma_rn(a, b, c); }

// Tile t of the (N, tiles-per-sample) grid: its sample, first pixel and valid pixels.
struct cd_cbn_tile { int n, p0, valid; };
__device__ __forceinline__ cd_cbn_tile cd_cbn_tile_of(long long t, int P, int tps, int TP) {
    const int n = (int)(t / tps), j = (int)(t - (long long)n * tps);
    return {n, j * TP, min(TP, P - j * TP)};
}

// Pixels in tiles [0, t): what the host's tile split gives CTA s (cd_cbn_pixels of its end
// minus its start).
__device__ __forceinline__ long long cd_cbn_pixels(long long t, int P, int tps, int TP) {
    const long long n = t / tps;
    return n * P + min((long long)(t - n * tps) * TP, (long long)P);
}

// CTA s of S takes tiles [cd_cbn_first(s), cd_cbn_first(s + 1)).
__device__ __forceinline__ long long cd_cbn_first(int s, int S, long long tiles) {
    return tiles * s / S;
}

// w (O, C) into shared memory as A, rows WS apart, zero past O rows and C columns.
template <typename T, typename A, int MAXC, int WS>
__device__ __forceinline__ void cd_cbn_load_w(const T* __restrict__ w, A* ws, int O, int C) {
    for (int i = threadIdx.x; i < MAXC * WS; i += blockDim.x) {
        const int o = i / WS, c = i - o * WS;
        ws[i] = (o < O && c < C) ? A(cd_load(w[o * C + c])) : A(0);
    }
}

// x's tile (C rows of TP pixels of sample n from p0), staged through registers: fetch() issues
// a tile's loads (one value a thread every 256, zero past C rows and the valid pixels), put()
// stores it to shared memory (all MAXC rows, TS apart). The kernels fetch the next tile before
// computing on the current one, so its loads are in flight meanwhile: a CTA holds a few KB of
// x a tile (C = 16 at 32 pixels: 2 KB), and waiting on each tile's loads in turn left the SMs
// mostly idle.
template <typename T, typename A, typename K>
struct cd_cbn_xstage {
    static constexpr int PER = K::MAXC * K::TP / 256;
    A v[PER];
    __device__ __forceinline__ void fetch(const T* __restrict__ x, int C, int P, cd_cbn_tile tl) {
        const T* __restrict__ base = x + (long long)tl.n * C * P + tl.p0;
#pragma unroll
        for (int j = 0; j < PER; ++j) {
            const int i = threadIdx.x + 256 * j, c = i / K::TP, p = i - c * K::TP;
            v[j] = (c < C && p < tl.valid) ? A(cd_load(base[(long long)c * P + p])) : A(0);
        }
    }
    __device__ __forceinline__ void put(A* xs) const {
#pragma unroll
        for (int j = 0; j < PER; ++j) {
            const int i = threadIdx.x + 256 * j, c = i / K::TP;
            xs[c * K::TS + (i - c * K::TP)] = v[j];
        }
    }
};

// y of the thread's R channels at its 4 pixels: y[r][q] = sum_c w[o][c] x[c][4 pg + q], c in
// order (the same bits in every kernel).
template <typename A, int R, int TS, int WS>
__device__ __forceinline__ void cd_cbn_conv(const A* ws, const A* xs, int C, int og, int pg,
                                            A (&y)[R][4]) {
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int q = 0; q < 4; ++q) y[r][q] = A(0);
    for (int c = 0; c < C; ++c) {
        A xv[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) xv[q] = xs[c * TS + 4 * pg + q];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const A wv = ws[(og + 32 * r) * WS + c];
#pragma unroll
            for (int q = 0; q < 4; ++q) y[r][q] = cd_fma(wv, xv[q], y[r][q]);
        }
    }
}

// A thread's 4 consecutive pixels of one channel row: one vector access where all 4 are valid
// and the row allows it (vec: P % 4 == 0, so every such run starts 4-element aligned in the
// pool's 256-byte aligned arrays), else one value at a time.
template <typename T, typename A>
__device__ __forceinline__ void cd_cbn_load4(const T* __restrict__ src, int nvalid, bool vec,
                                             A (&v)[4]) {
    if (vec && nvalid >= 4) {
        const cd_vec<T, 4> u = *reinterpret_cast<const cd_vec<T, 4>*>(src);
#pragma unroll
        for (int q = 0; q < 4; ++q) v[q] = A(cd_load(u.v[q]));
        return;
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) v[q] = q < nvalid ? A(cd_load(src[q])) : A(0);
}

template <typename T, typename A>
__device__ __forceinline__ void cd_cbn_store4(T* __restrict__ dst, int nvalid, bool vec,
                                              const A (&v)[4]) {
    if (vec && nvalid >= 4) {
        cd_vec<T, 4> u;
#pragma unroll
        for (int q = 0; q < 4; ++q) u.v[q] = cd_store<T>(v[q]);
        *reinterpret_cast<cd_vec<T, 4>*>(dst) = u;
        return;
    }
#pragma unroll
    for (int q = 0; q < 4; ++q)
        if (q < nvalid) dst[q] = cd_store<T>(v[q]);
}

// g at the thread's R channels and 4 pixels of a tile (zeros for rows past O). The backward
// kernels issue these loads before the tile's convolution, which hides their latency.
template <typename T, typename A, int R>
__device__ __forceinline__ void cd_cbn_load_g(const T* __restrict__ g, int O, int P,
                                              cd_cbn_tile tl, int og, int pg, bool vec,
                                              A (&gq)[R][4]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int o = og + 32 * r;
        if (o < O) {
            cd_cbn_load4<T, A>(g + ((long long)tl.n * O + o) * P + tl.p0 + 4 * pg,
                               tl.valid - 4 * pg, vec, gq[r]);
        } else {
#pragma unroll
            for (int q = 0; q < 4; ++q) gq[r][q] = A(0);
        }
    }
}

// Sum over the 8 lanes of a pixel group (the lanes that share og); every lane gets it.
template <typename A>
__device__ __forceinline__ A cd_cbn_group_sum(A v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    v += __shfl_xor_sync(0xffffffffu, v, 4);
    return v;
}

// Statistics partials: CTA s of gridDim.x, part[0][o][s] = its tiles' mean of y[o], part[1][o][s]
// = M2 (sum of squared deviations from it). Each tile's mean and M2 are two passes over the
// registers; merged into the running pair with Chan et al.'s formula (no sum y^2 - n mean^2
// cancellation).
template <typename T>
__global__ void conv_bn_stats(const T* __restrict__ x, const T* __restrict__ w,
                              typename cd_acc<T>::type* __restrict__ part, int C, int O, int P,
                              long long tiles) {
    typedef typename cd_acc<T>::type A;
    typedef cd_cbn<A> K;
    __shared__ __align__(16) A ws[K::MAXC * K::WS];
    __shared__ __align__(16) A xs[K::MAXC * K::TS];
    const int og = threadIdx.x >> 3, pg = threadIdx.x & 7, s = blockIdx.x, S = gridDim.x;
    const int tps = (P + K::TP - 1) / K::TP;
    cd_cbn_load_w<T, A, K::MAXC, K::WS>(w, ws, O, C);
    A cnt = 0, mean[K::R], m2[K::R];
#pragma unroll
    for (int r = 0; r < K::R; ++r) mean[r] = m2[r] = A(0);
    const long long t0 = cd_cbn_first(s, S, tiles), t1 = cd_cbn_first(s + 1, S, tiles);
    cd_cbn_xstage<T, A, K> stage;
    stage.fetch(x, C, P, cd_cbn_tile_of(t0, P, tps, K::TP));
    for (long long t = t0; t < t1; ++t) {
        const cd_cbn_tile tl = cd_cbn_tile_of(t, P, tps, K::TP);
        __syncthreads();
        stage.put(xs);
        __syncthreads();
        if (t + 1 < t1) stage.fetch(x, C, P, cd_cbn_tile_of(t + 1, P, tps, K::TP));
        A y[K::R][4];
        cd_cbn_conv<A, K::R, K::TS, K::WS>(ws, xs, C, og, pg, y);
        const A nb = A(tl.valid);
#pragma unroll
        for (int r = 0; r < K::R; ++r) {
            A sum = 0;
#pragma unroll
            for (int q = 0; q < 4; ++q) sum += 4 * pg + q < tl.valid ? y[r][q] : A(0);
            const A mt = cd_cbn_group_sum(sum) / nb;
            A d2 = 0;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const A d = y[r][q] - mt;
                d2 += 4 * pg + q < tl.valid ? d * d : A(0);
            }
            const A m2t = cd_cbn_group_sum(d2);
            const A n = cnt + nb, delta = mt - mean[r];
            mean[r] += delta * (nb / n);
            m2[r] += m2t + delta * delta * (cnt * nb / n);
        }
        cnt += nb;
    }
    if (pg == 0) {
#pragma unroll
        for (int r = 0; r < K::R; ++r) {
            const int o = og + 32 * r;
            if (o < O) {
                part[(long long)o * S + s] = mean[r];
                part[(long long)(O + o) * S + s] = m2[r];
            }
        }
    }
}

// Channel o = blockIdx.x: the S partials of conv_bn_stats merged (Chan et al.'s S-way form, as
// norm.cu's cd_bn_merge_stats, over the threads in a fixed tree) into stats[0..2][o] = mean,
// biased variance, inverse std, and the running statistics updated when update.
template <typename T>
__global__ void conv_bn_merge(const typename cd_acc<T>::type* __restrict__ part,
                              typename cd_acc<T>::type* __restrict__ stats,
                              typename cd_acc<T>::type* __restrict__ run_mean,
                              typename cd_acc<T>::type* __restrict__ run_var, int O, int P,
                              long long tiles, int S, double eps, double momentum,
                              double unbias, int update) {
    typedef typename cd_acc<T>::type A;
    typedef cd_cbn<A> K;
    __shared__ A sh[32];
    const int o = blockIdx.x, tps = (P + K::TP - 1) / K::TP;
    const A* pmean = part + (long long)o * S;
    const A* pm2 = part + (long long)(O + o) * S;
    auto count = [&](int s) {
        return A(cd_cbn_pixels(cd_cbn_first(s + 1, S, tiles), P, tps, K::TP) -
                 cd_cbn_pixels(cd_cbn_first(s, S, tiles), P, tps, K::TP));
    };
    const long long total = cd_cbn_pixels(tiles, P, tps, K::TP);
    A sum = 0;
    for (int s = threadIdx.x; s < S; s += blockDim.x) sum += count(s) * pmean[s];
    const A mean = cd_block_sum(sum, sh) / A(total);
    A acc = 0;
    for (int s = threadIdx.x; s < S; s += blockDim.x) {
        const A d = pmean[s] - mean;
        acc += pm2[s] + count(s) * d * d;
    }
    const A m2 = cd_block_sum(acc, sh);
    if (threadIdx.x == 0)
        cd_bn_stats_out(o, O, mean, m2, (unsigned int)total, stats, run_mean, run_var, eps,
                        momentum, unbias, update);
}

// The thread's per-channel BN coefficients: mean, k = inv_std * gamma, beta.
template <typename A, int R>
__device__ __forceinline__ void cd_cbn_coefs(const A* __restrict__ stats,
                                             const A* __restrict__ gamma,
                                             const A* __restrict__ beta, int O, int og,
                                             A (&m)[R], A (&k)[R], A (&b)[R]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int o = min(og + 32 * r, O - 1);  // rows past O compute zeros, never stored
        m[r] = stats[o];
        k[r] = stats[2 * O + o] * gamma[o];
        b[r] = beta[o];
    }
}

// z = act((y - mean) * k + beta) for a grid-stride walk over the tiles (a CTA's tiles a
// contiguous run). The product is rounded on its own (cd_bn_value), as backward recomputes it.
template <typename T>
__global__ void conv_bn_fwd(const T* __restrict__ x, const T* __restrict__ w,
                            const typename cd_acc<T>::type* __restrict__ stats,
                            const typename cd_acc<T>::type* __restrict__ gamma,
                            const typename cd_acc<T>::type* __restrict__ beta,
                            T* __restrict__ z, int C, int O, int P, long long tiles, int relu) {
    typedef typename cd_acc<T>::type A;
    typedef cd_cbn<A> K;
    __shared__ __align__(16) A ws[K::MAXC * K::WS];
    __shared__ __align__(16) A xs[K::MAXC * K::TS];
    const int og = threadIdx.x >> 3, pg = threadIdx.x & 7, tps = (P + K::TP - 1) / K::TP;
    const bool vec = P % 4 == 0;
    cd_cbn_load_w<T, A, K::MAXC, K::WS>(w, ws, O, C);
    A m[K::R], k[K::R], b[K::R];
    cd_cbn_coefs<A, K::R>(stats, gamma, beta, O, og, m, k, b);
    const long long t0 = cd_cbn_first(blockIdx.x, gridDim.x, tiles);
    const long long t1 = cd_cbn_first(blockIdx.x + 1, gridDim.x, tiles);
    cd_cbn_xstage<T, A, K> stage;
    stage.fetch(x, C, P, cd_cbn_tile_of(t0, P, tps, K::TP));
    for (long long t = t0; t < t1; ++t) {
        const cd_cbn_tile tl = cd_cbn_tile_of(t, P, tps, K::TP);
        __syncthreads();
        stage.put(xs);
        __syncthreads();
        if (t + 1 < t1) stage.fetch(x, C, P, cd_cbn_tile_of(t + 1, P, tps, K::TP));
        A y[K::R][4];
        cd_cbn_conv<A, K::R, K::TS, K::WS>(ws, xs, C, og, pg, y);
#pragma unroll
        for (int r = 0; r < K::R; ++r) {
            const int o = og + 32 * r;
            if (o >= O) continue;
            A v[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                v[q] = cd_bn_value(y[r][q], m[r], k[r], b[r], 1);
                if (relu && v[q] < A(0)) v[q] = A(0);
            }
            cd_cbn_store4<T, A>(z + ((long long)tl.n * O + o) * P + tl.p0 + 4 * pg,
                                tl.valid - 4 * pg, vec, v);
        }
    }
}

// Backward sums: CTA s of gridDim.x, part[0][o][s] = sum g' and part[1][o][s] = sum g' (y -
// mean) over its tiles, g' = g masked by the fused ReLU where the forward stored no positive
// value (cd_relu_pass, as norm.cu's backward).
template <typename T>
__global__ void conv_bn_bwd_sums(const T* __restrict__ g, const T* __restrict__ x,
                                 const T* __restrict__ w,
                                 const typename cd_acc<T>::type* __restrict__ stats,
                                 const typename cd_acc<T>::type* __restrict__ gamma,
                                 const typename cd_acc<T>::type* __restrict__ beta,
                                 typename cd_acc<T>::type* __restrict__ part, int C, int O,
                                 int P, long long tiles, int relu) {
    typedef typename cd_acc<T>::type A;
    typedef cd_cbn<A> K;
    __shared__ __align__(16) A ws[K::MAXC * K::WS];
    __shared__ __align__(16) A xs[K::MAXC * K::TS];
    const int og = threadIdx.x >> 3, pg = threadIdx.x & 7, s = blockIdx.x, S = gridDim.x;
    const int tps = (P + K::TP - 1) / K::TP;
    const bool vec = P % 4 == 0;
    cd_cbn_load_w<T, A, K::MAXC, K::WS>(w, ws, O, C);
    A m[K::R], k[K::R], b[K::R], sg[K::R], sgd[K::R];
    cd_cbn_coefs<A, K::R>(stats, gamma, beta, O, og, m, k, b);
#pragma unroll
    for (int r = 0; r < K::R; ++r) sg[r] = sgd[r] = A(0);
    const long long t0 = cd_cbn_first(s, S, tiles), t1 = cd_cbn_first(s + 1, S, tiles);
    cd_cbn_xstage<T, A, K> stage;
    stage.fetch(x, C, P, cd_cbn_tile_of(t0, P, tps, K::TP));
    for (long long t = t0; t < t1; ++t) {
        const cd_cbn_tile tl = cd_cbn_tile_of(t, P, tps, K::TP);
        __syncthreads();
        stage.put(xs);
        __syncthreads();
        if (t + 1 < t1) stage.fetch(x, C, P, cd_cbn_tile_of(t + 1, P, tps, K::TP));
        A gq[K::R][4], y[K::R][4];
        cd_cbn_load_g<T, A, K::R>(g, O, P, tl, og, pg, vec, gq);
        cd_cbn_conv<A, K::R, K::TS, K::WS>(ws, xs, C, og, pg, y);
#pragma unroll
        for (int r = 0; r < K::R; ++r) {
            if (og + 32 * r >= O) continue;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                A gv = gq[r][q];  // zero past the valid pixels
                if (relu && !cd_relu_pass<T>(cd_bn_value(y[r][q], m[r], k[r], b[r], 1)))
                    gv = A(0);
                sg[r] += gv;
                sgd[r] += gv * (y[r][q] - m[r]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < K::R; ++r) {
        const A a = cd_cbn_group_sum(sg[r]), d = cd_cbn_group_sum(sgd[r]);
        const int o = og + 32 * r;
        if (pg == 0 && o < O) {
            part[(long long)o * S + s] = a;
            part[(long long)(O + o) * S + s] = d;
        }
    }
}

// Channel o = blockIdx.x: conv_bn_bwd_sums's S partials summed (a fixed tree), then beta's and
// gamma's gradients (sg_out, sgx_out) and gy's coefficients coef[0..2][o] (cd_bn_bwd_out, in
// training).
template <typename T>
__global__ void conv_bn_bwd_coef(const typename cd_acc<T>::type* __restrict__ part,
                                 const typename cd_acc<T>::type* __restrict__ stats,
                                 const typename cd_acc<T>::type* __restrict__ gamma,
                                 typename cd_acc<T>::type* __restrict__ sg_out,
                                 typename cd_acc<T>::type* __restrict__ sgx_out,
                                 typename cd_acc<T>::type* __restrict__ coef, int O, int S,
                                 long long total) {
    typedef typename cd_acc<T>::type A;
    __shared__ A sh[32];
    const int o = blockIdx.x;
    A sg = 0, sgd = 0;
    for (int s = threadIdx.x; s < S; s += blockDim.x) {
        sg += part[(long long)o * S + s];
        sgd += part[(long long)(O + o) * S + s];
    }
    sg = cd_block_sum(sg, sh);
    sgd = cd_block_sum(sgd, sh);
    if (threadIdx.x == 0)
        cd_bn_bwd_out(o, O, sg, sgd, (unsigned int)total, stats + 2 * O, gamma, sg_out, sgx_out,
                      coef, O, 1, 1);
}

// gx[n, c, p] = sum_o w[o, c] gy[n, o, p], gy = a g' + b (y - mean) + d (coef's rows), for a
// CTA's run of tiles (gy of a tile staged in shared memory), and the CTA's partial of w's
// gradient, wpart[s][o][c] = sum over its pixels of gy[o] x[c] (thread t owns a BO x BC block
// of (o, c)), summed over s by the host.
template <typename T>
__global__ void __launch_bounds__(256, 3) conv_bn_bwd_apply(const T* __restrict__ g, const T* __restrict__ x,
                                  const T* __restrict__ w,
                                  const typename cd_acc<T>::type* __restrict__ stats,
                                  const typename cd_acc<T>::type* __restrict__ gamma,
                                  const typename cd_acc<T>::type* __restrict__ beta,
                                  const typename cd_acc<T>::type* __restrict__ coef,
                                  T* __restrict__ gx, typename cd_acc<T>::type* __restrict__ wpart,
                                  int C, int O, int P, long long tiles, int relu) {
    typedef typename cd_acc<T>::type A;
    typedef cd_cbn<A> K;
    constexpr int B = K::MAXC / 16;  // the (o, c) block a thread owns is B x B
    __shared__ __align__(16) A ws[K::MAXC * K::WS];
    __shared__ __align__(16) A xs[K::MAXC * K::TS];
    __shared__ __align__(16) A gys[K::MAXC * K::TS];
    const int og = threadIdx.x >> 3, pg = threadIdx.x & 7, s = blockIdx.x, S = gridDim.x;
    const int ob = threadIdx.x >> 4, cb = threadIdx.x & 15;
    const int tps = (P + K::TP - 1) / K::TP;
    const bool vec = P % 4 == 0;
    cd_cbn_load_w<T, A, K::MAXC, K::WS>(w, ws, O, C);
    A m[K::R], k[K::R], b[K::R], ca[K::R], cbv[K::R], cd[K::R];
    cd_cbn_coefs<A, K::R>(stats, gamma, beta, O, og, m, k, b);
#pragma unroll
    for (int r = 0; r < K::R; ++r) {
        const int o = min(og + 32 * r, O - 1);
        ca[r] = coef[o];
        cbv[r] = coef[O + o];
        cd[r] = coef[2 * O + o];
    }
    A acc[B][B];
#pragma unroll
    for (int i = 0; i < B; ++i)
#pragma unroll
        for (int j = 0; j < B; ++j) acc[i][j] = A(0);
    const long long t0 = cd_cbn_first(s, S, tiles), t1 = cd_cbn_first(s + 1, S, tiles);
    cd_cbn_xstage<T, A, K> stage;
    stage.fetch(x, C, P, cd_cbn_tile_of(t0, P, tps, K::TP));
    for (long long t = t0; t < t1; ++t) {
        const cd_cbn_tile tl = cd_cbn_tile_of(t, P, tps, K::TP);
        __syncthreads();  // the last tile's readers of xs and gys are done
        stage.put(xs);
        __syncthreads();
        if (t + 1 < t1) stage.fetch(x, C, P, cd_cbn_tile_of(t + 1, P, tps, K::TP));
        A gq[K::R][4], y[K::R][4];
        cd_cbn_load_g<T, A, K::R>(g, O, P, tl, og, pg, vec, gq);
        cd_cbn_conv<A, K::R, K::TS, K::WS>(ws, xs, C, og, pg, y);
#pragma unroll
        for (int r = 0; r < K::R; ++r) {
            const int o = og + 32 * r;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                A gy = 0;
                if (o < O && 4 * pg + q < tl.valid) {
                    A gv = gq[r][q];
                    if (relu && !cd_relu_pass<T>(cd_bn_value(y[r][q], m[r], k[r], b[r], 1)))
                        gv = A(0);
                    gy = ca[r] * gv + cbv[r] * (y[r][q] - m[r]) + cd[r];
                }
                gys[o * K::TS + 4 * pg + q] = gy;  // zero past O and the valid pixels
            }
        }
        __syncthreads();
        // gx: the thread's input channels og + 32 r at its 4 pixels
#pragma unroll
        for (int r = 0; r < K::R; ++r) {
            const int c = og + 32 * r;
            A v[4] = {A(0), A(0), A(0), A(0)};
            for (int o = 0; o < O; ++o) {
                const A wv = ws[o * K::WS + c];
#pragma unroll
                for (int q = 0; q < 4; ++q) v[q] = cd_fma(wv, gys[o * K::TS + 4 * pg + q], v[q]);
            }
            if (c < C)
                cd_cbn_store4<T, A>(gx + ((long long)tl.n * C + c) * P + tl.p0 + 4 * pg,
                                    tl.valid - 4 * pg, vec, v);
        }
        // w's gradient: the thread's B x B block of (o, c), over the tile's pixels
        for (int p = 0; p < K::TP; ++p) {
            A gv[B], xv[B];
#pragma unroll
            for (int i = 0; i < B; ++i) {
                gv[i] = gys[(ob * B + i) * K::TS + p];
                xv[i] = xs[(cb * B + i) * K::TS + p];
            }
#pragma unroll
            for (int i = 0; i < B; ++i)
#pragma unroll
                for (int j = 0; j < B; ++j) acc[i][j] = cd_fma(gv[i], xv[j], acc[i][j]);
        }
    }
#pragma unroll
    for (int i = 0; i < B; ++i)
#pragma unroll
        for (int j = 0; j < B; ++j) {
            const int o = ob * B + i, c = cb * B + j;
            if (o < O && c < C) wpart[((long long)s * O + o) * C + c] = acc[i][j];
        }
}

#ifdef CUDROP_INSTANTIATE  // explicit instances for the nvcc compile check (NVRTC uses name_expressions)
#define CD_INST(T) \
    template __global__ void conv_bn_stats<T>(const T*, const T*, cd_acc<T>::type*, int, int, \
        int, long long); \
    template __global__ void conv_bn_merge<T>(const cd_acc<T>::type*, cd_acc<T>::type*, \
        cd_acc<T>::type*, cd_acc<T>::type*, int, int, long long, int, double, double, double, \
        int); \
    template __global__ void conv_bn_fwd<T>(const T*, const T*, const cd_acc<T>::type*, \
        const cd_acc<T>::type*, const cd_acc<T>::type*, T*, int, int, int, long long, int); \
    template __global__ void conv_bn_bwd_sums<T>(const T*, const T*, const T*, \
        const cd_acc<T>::type*, const cd_acc<T>::type*, const cd_acc<T>::type*, \
        cd_acc<T>::type*, int, int, int, long long, int); \
    template __global__ void conv_bn_bwd_coef<T>(const cd_acc<T>::type*, \
        const cd_acc<T>::type*, const cd_acc<T>::type*, cd_acc<T>::type*, cd_acc<T>::type*, \
        cd_acc<T>::type*, int, int, long long); \
    template __global__ void conv_bn_bwd_apply<T>(const T*, const T*, const T*, \
        const cd_acc<T>::type*, const cd_acc<T>::type*, const cd_acc<T>::type*, \
        const cd_acc<T>::type*, T*, cd_acc<T>::type*, int, int, int, long long, int);
CD_INST(float) CD_INST(double) CD_INST(cd_f16) CD_INST(cd_bf16)
#endif
