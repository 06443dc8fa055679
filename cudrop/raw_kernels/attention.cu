// Fused multi-head self-attention (the flash-attention algorithm): softmax(q kᵀ * scale) v
// without a (B, H, T, T) array, for float16/bfloat16 on mma.sync tensor cores (sm_80+),
// accumulating in float32. One CTA of 4 warps owns 64 rows (16 a warp) and walks the other
// side's 64-row blocks through shared memory; the probabilities stay in registers (an
// accumulator fragment of S is the A fragment of P v, so P never leaves the warp).
//
// Layouts (row-major, elements): qkv (B, T, 3, H, HD) — a fused q|k|v projection's output,
// read in place (no head transposes); o and go (B, T, H, HD); lse and dd (B, H, T) float32;
// gqkv like qkv. HD (CD_HD, set by the host: 16, 32 or 64) is the head dimension; rows are
// 16-byte aligned (the host checks d % 8 == 0 and 16-byte aligned bases). T is any length:
// rows past T load as zeros and are masked; ``causal`` hides keys after the query.
//
// lse is the row's log-sum-exp in base-2 units of the scaled scores (c = scale * log2 e):
// P = exp2(s * c - lse). Backward (deterministic, no atomics): attn_bwd_dot computes
// dd = rowsum(go * o); attn_bwd_dkdv owns 64 keys and sums dK, dV over the query blocks;
// attn_bwd_dq owns 64 queries and sums dQ over the key blocks (recomputing S and dP: the
// attention's FLOPs are a few % of a transformer step, the atomics they would save are not
// deterministic).
//
// Templates are instantiated for every dtype (the loader's rule); the bodies exist for the
// 16-bit types only and the host never launches the others.
#include "accum.cuh"
#include "mma.cuh"

#ifndef CD_HD
#define CD_HD 64
#endif

namespace cd_attn {
constexpr int HD = CD_HD;
constexpr int BR = 64;       // rows a CTA owns, 16 a warp
constexpr int BC = 64;       // rows of the other side per step (BR == BC: the causal walks
                             // start and stop at the diagonal block)
constexpr int LD = HD + 8;   // shared row pitch in elements: 16-byte rows, and the 8 rows an
                             // ldmatrix reads fall in 8 different bank groups
constexpr int KC = HD / 16;  // 16-wide k chunks over the head dim
constexpr int NT = HD / 8;   // 8-wide n tiles over the head dim
constexpr int ST = BC / 8;   // 8-wide n tiles over a score block
static_assert(HD % 16 == 0 && HD <= 64, "head dim: 16, 32 or 64");

// rows [row0, row0 + 64) of a (T, HD) head slice with row pitch `pitch`, into a shared tile;
// rows past T are zero-filled (cp.async with source size 0 reads nothing).
template <typename T>
__device__ __forceinline__ void load_tile(T* sm, const T* g, long long pitch, int row0, int t) {
    constexpr int CH = HD / 8;  // 16-byte chunks a row
    for (int i = threadIdx.x; i < 64 * CH; i += blockDim.x) {
        const int r = i / CH, c = i % CH;
        const bool ok = row0 + r < t;
        const T* src = ok ? g + (long long)(row0 + r) * pitch + c * 8 : g;
        cd_cp_async16(cd_smem_addr(sm + r * LD + c * 8), src, ok);
    }
}

// A fragment (16 x 16 at rows r0, cols c0) of a row-major shared tile.
template <typename T>
__device__ __forceinline__ void ld_a(unsigned* a, const T* sm, int r0, int c0, int lane) {
    const int row = r0 + (lane & 7) + ((lane >> 3) & 1) * 8, col = c0 + (lane >> 4) * 8;
    cd_ldsm_x4<false>(a, cd_smem_addr(sm + row * LD + col));
}
// B fragments of two n tiles (n0, n0 + 8) at k chunk k0 for B = Mᵀ, M a row-major shared tile
// with n along its rows: b[0..1] for n0, b[2..3] for n0 + 8.
template <typename T>
__device__ __forceinline__ void ld_bt(unsigned* b, const T* sm, int n0, int k0, int lane) {
    const int row = n0 + (lane & 7) + (lane >> 4) * 8, col = k0 + ((lane >> 3) & 1) * 8;
    cd_ldsm_x4<false>(b, cd_smem_addr(sm + row * LD + col));
}
// The same for B = M, M with k along its rows (ldmatrix transposes).
template <typename T>
__device__ __forceinline__ void ld_b(unsigned* b, const T* sm, int k0, int n0, int lane) {
    const int row = k0 + (lane & 7) + ((lane >> 3) & 1) * 8, col = n0 + (lane >> 4) * 8;
    cd_ldsm_x4<true>(b, cd_smem_addr(sm + row * LD + col));
}

// Two floats as one 16-bit pair register, `lo` in the low half (the lower column).
template <typename T> __device__ __forceinline__ unsigned pack2(float lo, float hi) {
    unsigned r;
    if constexpr (cd_is_bf16<T>::value)
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    else
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
// The A fragment of k chunk c (columns 16c..16c+15) from a warp's 16 x 64 accumulator tiles.
template <typename T> __device__ __forceinline__ void acc_as_a(unsigned* a, float (*s)[4], int c) {
    a[0] = pack2<T>(s[2 * c][0], s[2 * c][1]);
    a[1] = pack2<T>(s[2 * c][2], s[2 * c][3]);
    a[2] = pack2<T>(s[2 * c + 1][0], s[2 * c + 1][1]);
    a[3] = pack2<T>(s[2 * c + 1][2], s[2 * c + 1][3]);
}

// acc (16 x 64) += A (16 x HD, kept as KC fragments) · Mᵀ, M a (64, HD) shared tile.
template <typename T>
__device__ __forceinline__ void mma_abt(float (*acc)[4], const unsigned (*a)[4], const T* m,
                                        int lane) {
#pragma unroll
    for (int j = 0; j < ST / 2; ++j)
#pragma unroll
        for (int c = 0; c < KC; ++c) {
            unsigned b[4];
            ld_bt(b, m, j * 16, c * 16, lane);
            cd_mma<T>(acc[2 * j], a[c], b);
            cd_mma<T>(acc[2 * j + 1], a[c], b + 2);
        }
}
// acc (16 x HD) += P (16 x 64, accumulator tiles) · M, M a (64, HD) shared tile.
template <typename T>
__device__ __forceinline__ void mma_pb(float (*acc)[4], float (*p)[4], const T* m, int lane) {
#pragma unroll
    for (int c = 0; c < BC / 16; ++c) {
        unsigned a[4];
        acc_as_a<T>(a, p, c);
#pragma unroll
        for (int j = 0; j < NT / 2; ++j) {
            unsigned b[4];
            ld_b(b, m, c * 16, j * 16, lane);
            cd_mma<T>(acc[2 * j], a, b);
            cd_mma<T>(acc[2 * j + 1], a, b + 2);
        }
    }
}

__device__ __forceinline__ void zero(float (*acc)[4], int n) {
    for (int i = 0; i < n; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
}

// Stores a warp's 16 x HD accumulator (times `mul`) at rows row0 (+8) of a (T, HD) slice with
// row pitch `pitch`, rows past T skipped.
template <typename T>
__device__ __forceinline__ void store_rows(T* g, long long pitch, int row0, int t,
                                           float (*acc)[4], float mul0, float mul1, int lane) {
    const int tq = lane & 3;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = row0 + h * 8;
        if (row >= t) continue;
        const float mul = h ? mul1 : mul0;
        unsigned* dst = reinterpret_cast<unsigned*>(g + (long long)row * pitch + 2 * tq);
#pragma unroll
        for (int n = 0; n < NT; ++n)
            dst[n * 4] = pack2<T>(acc[n][2 * h] * mul, acc[n][2 * h + 1] * mul);
    }
}
}  // namespace cd_attn

// grid (B * H, ceil(T / 64)), block 128.
template <typename T>
__global__ void __launch_bounds__(128)
attn_fwd(const T* __restrict__ qkv, T* __restrict__ o, float* __restrict__ lse, int t, int heads,
         int causal, float c) {
    using namespace cd_attn;
    if constexpr (sizeof(T) == 2) {
        // K/V double-buffered: block kb + 1 loads while block kb multiplies
        __shared__ __align__(16) T Qs[BR * LD], Ks[2][BC * LD], Vs[2][BC * LD];
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, tq = lane & 3;
        const int bh = blockIdx.x, b = bh / heads, h = bh % heads, d = heads * HD;
        const int qb = causal ? gridDim.y - 1 - blockIdx.y : blockIdx.y;  // long rows first
        const long long pitch = 3LL * d;
        const T* qg = qkv + (long long)b * t * pitch + h * HD;
        const int q0 = qb * BR, row0 = q0 + warp * 16 + (lane >> 2);
        load_tile(Qs, qg, pitch, q0, t);
        load_tile(Ks[0], qg + d, pitch, 0, t);
        load_tile(Vs[0], qg + 2 * d, pitch, 0, t);
        cd_cp_commit();
        float acc[NT][4], m[2] = {cd_neg_inf(0.f), cd_neg_inf(0.f)}, l[2] = {0.f, 0.f};
        zero(acc, NT);
        unsigned qa[KC][4];
        const int kbs = causal ? qb + 1 : (t + BC - 1) / BC;
        for (int kb = 0; kb < kbs; ++kb) {
            const int buf = kb & 1;
            if (kb + 1 < kbs) {  // its buffer was last read in step kb - 1, before the barrier
                load_tile(Ks[buf ^ 1], qg + d, pitch, (kb + 1) * BC, t);
                load_tile(Vs[buf ^ 1], qg + 2 * d, pitch, (kb + 1) * BC, t);
                cd_cp_commit();
                cd_cp_wait<1>();
            } else {
                cd_cp_wait<0>();
            }
            __syncthreads();
            if (kb == 0)
                for (int k = 0; k < KC; ++k) ld_a(qa[k], Qs, warp * 16, k * 16, lane);
            float s[ST][4];
            zero(s, ST);
            mma_abt<T>(s, qa, Ks[buf], lane);
            // only the diagonal block (causal) and the last (ragged T) hide keys
            const bool edge = (causal && kb == qb) || (kb + 1) * BC > t;
            float mx[2] = {m[0], m[1]};
#pragma unroll
            for (int n = 0; n < ST; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = kb * BC + n * 8 + 2 * tq + (e & 1), row = row0 + (e >> 1) * 8;
                    const bool hide = edge && (key >= t || (causal && key > row));
                    s[n][e] = hide ? cd_neg_inf(0.f) : s[n][e] * c;
                    mx[e >> 1] = fmaxf(mx[e >> 1], s[n][e]);
                }
            float corr[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {  // key 0 is always visible: mx is finite
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
                corr[r] = exp2f(m[r] - mx[r]);
                m[r] = mx[r];
                l[r] *= corr[r];
            }
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[n][e] *= corr[e >> 1];
#pragma unroll
            for (int n = 0; n < ST; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    s[n][e] = exp2f(s[n][e] - m[e >> 1]);
                    l[e >> 1] += s[n][e];
                }
            mma_pb<T>(acc, s, Vs[buf], lane);
            __syncthreads();  // every warp is done with this buffer before it is refilled
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
            l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        }
        store_rows(o + (long long)b * t * d + h * HD, d, row0, t, acc, 1.f / l[0], 1.f / l[1],
                   lane);
        if (tq == 0)
            for (int r = 0; r < 2; ++r)
                if (row0 + 8 * r < t) lse[(long long)bh * t + row0 + 8 * r] = m[r] + log2f(l[r]);
    }
}

// dd[b, h, t] = sum_j go[b, t, h, j] * o[b, t, h, j]; one thread per 8 elements, HD / 8
// neighbouring lanes a row. rows = B * T * H.
template <typename T>
__global__ void attn_bwd_dot(const T* __restrict__ go, const T* __restrict__ o,
                             float* __restrict__ dd, long long rows, int t, int heads) {
    using namespace cd_attn;
    if constexpr (sizeof(T) == 2) {
        constexpr int L = HD / 8;
        const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
        const long long row = i / L;
        float sum = 0.f;
        if (row < rows) {
            const cd_vec4<T>* a = reinterpret_cast<const cd_vec4<T>*>(go + i * 8);
            const cd_vec4<T>* b = reinterpret_cast<const cd_vec4<T>*>(o + i * 8);
#pragma unroll
            for (int v = 0; v < 2; ++v) {
                const cd_vec4<T> x = a[v], y = b[v];
#pragma unroll
                for (int e = 0; e < 4; ++e) sum += cd_to_float(x.v[e]) * cd_to_float(y.v[e]);
            }
        }
#pragma unroll
        for (int w = 1; w < L; w <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, w);
        if (row < rows && i % L == 0) {
            const long long h = row % heads, bt = row / heads, b = bt / t, tt = bt % t;
            dd[(b * heads + h) * t + tt] = sum;
        }
    }
}

// The backward kernels walk the other side's blocks double-buffered: block i + 1 loads while
// block i multiplies. Their own 64 rows are read into registers once, so the shared tiles that
// held them become the second buffer (37 KB of static shared memory either way).
//
// grid (B * H, ceil(T / 64)), block 128: dK, dV of 64 keys.
template <typename T>
__global__ void __launch_bounds__(128)
attn_bwd_dkdv(const T* __restrict__ qkv, const T* __restrict__ go, const float* __restrict__ lse,
              const float* __restrict__ dd, T* __restrict__ gqkv, int t, int heads, int causal,
              float c, float scale) {
    using namespace cd_attn;
    if constexpr (sizeof(T) == 2) {
        __shared__ __align__(16) T X[2][2][BC * LD];  // [buffer][q, go]; K and V first
        __shared__ float Ls[2][BC], Ds[2][BC];
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, tq = lane & 3;
        const int bh = blockIdx.x, b = bh / heads, h = bh % heads, d = heads * HD;
        const int kb = blockIdx.y, k0 = kb * BR, key0 = k0 + warp * 16 + (lane >> 2);
        const long long pitch = 3LL * d;
        const T* qg = qkv + (long long)b * t * pitch + h * HD;
        const T* gg = go + (long long)b * t * d + h * HD;
        const int qbs = (t + BC - 1) / BC, first = causal ? kb : 0;
        auto stage = [&](int buf, int qb) {  // block qb's q, go, lse and dd into buffer buf
            load_tile(X[buf][0], qg, pitch, qb * BC, t);
            load_tile(X[buf][1], gg, (long long)d, qb * BC, t);
            cd_cp_commit();
            for (int i = threadIdx.x; i < BC; i += blockDim.x) {
                const int q = qb * BC + i;  // a row past T: P = exp2(-inf) = 0
                Ls[buf][i] = q < t ? lse[(long long)bh * t + q] : -cd_neg_inf(0.f);
                Ds[buf][i] = q < t ? dd[(long long)bh * t + q] : 0.f;
            }
        };
        load_tile(X[1][0], qg + d, pitch, k0, t);
        load_tile(X[1][1], qg + 2 * d, pitch, k0, t);
        stage(0, first);
        cd_cp_wait<0>();
        __syncthreads();
        unsigned ka[KC][4], va[KC][4];
        for (int k = 0; k < KC; ++k) {
            ld_a(ka[k], X[1][0], warp * 16, k * 16, lane);
            ld_a(va[k], X[1][1], warp * 16, k * 16, lane);
        }
        __syncthreads();  // K and V are in registers: buffer 1 is free
        float dk[NT][4], dv[NT][4];
        zero(dk, NT);
        zero(dv, NT);
        for (int qb = first; qb < qbs; ++qb) {
            const int buf = (qb - first) & 1;
            if (qb + 1 < qbs) stage(buf ^ 1, qb + 1);
            const T *Qs = X[buf][0], *Gs = X[buf][1];
            float s[ST][4], dp[ST][4];  // Sᵀ and dPᵀ: 16 keys x 64 queries
            zero(s, ST);
            zero(dp, ST);
            mma_abt<T>(s, ka, Qs, lane);
            mma_abt<T>(dp, va, Gs, lane);
#pragma unroll
            for (int n = 0; n < ST; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int col = n * 8 + 2 * tq + (e & 1), key = key0 + (e >> 1) * 8;
                    const bool hide = causal && qb == kb && key > qb * BC + col;
                    const float p = hide ? 0.f : exp2f(s[n][e] * c - Ls[buf][col]);
                    s[n][e] = p;
                    dp[n][e] = p * (dp[n][e] - Ds[buf][col]);  // dSᵀ
                }
            mma_pb<T>(dv, s, Gs, lane);
            mma_pb<T>(dk, dp, Qs, lane);
            cd_cp_wait<0>();
            __syncthreads();  // the next block has landed, and this one is read by every warp
        }
        T* gk = gqkv + (long long)b * t * pitch + d + h * HD;
        store_rows(gk, pitch, key0, t, dk, scale, scale, lane);
        store_rows(gk + d, pitch, key0, t, dv, 1.f, 1.f, lane);
    }
}

// grid (B * H, ceil(T / 64)), block 128: dQ of 64 queries.
template <typename T>
__global__ void __launch_bounds__(128)
attn_bwd_dq(const T* __restrict__ qkv, const T* __restrict__ go, const float* __restrict__ lse,
            const float* __restrict__ dd, T* __restrict__ gqkv, int t, int heads, int causal,
            float c, float scale) {
    using namespace cd_attn;
    if constexpr (sizeof(T) == 2) {
        __shared__ __align__(16) T X[2][2][BC * LD];  // [buffer][k, v]; q and go first
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, tq = lane & 3;
        const int bh = blockIdx.x, b = bh / heads, h = bh % heads, d = heads * HD;
        const int qb = causal ? gridDim.y - 1 - blockIdx.y : blockIdx.y;
        const int q0 = qb * BR, row0 = q0 + warp * 16 + (lane >> 2);
        const long long pitch = 3LL * d;
        const T* qg = qkv + (long long)b * t * pitch + h * HD;
        auto stage = [&](int buf, int kb) {
            load_tile(X[buf][0], qg + d, pitch, kb * BC, t);
            load_tile(X[buf][1], qg + 2 * d, pitch, kb * BC, t);
            cd_cp_commit();
        };
        load_tile(X[1][0], qg, pitch, q0, t);
        load_tile(X[1][1], go + (long long)b * t * d + h * HD, (long long)d, q0, t);
        stage(0, 0);
        float lr[2], dr[2];
        for (int r = 0; r < 2; ++r) {
            const int q = row0 + 8 * r;
            lr[r] = q < t ? lse[(long long)bh * t + q] : -cd_neg_inf(0.f);
            dr[r] = q < t ? dd[(long long)bh * t + q] : 0.f;
        }
        cd_cp_wait<0>();
        __syncthreads();
        unsigned qa[KC][4], ga[KC][4];
        for (int k = 0; k < KC; ++k) {
            ld_a(qa[k], X[1][0], warp * 16, k * 16, lane);
            ld_a(ga[k], X[1][1], warp * 16, k * 16, lane);
        }
        __syncthreads();  // q and go are in registers: buffer 1 is free
        float dq[NT][4];
        zero(dq, NT);
        const int kbs = causal ? qb + 1 : (t + BC - 1) / BC;
        for (int kb = 0; kb < kbs; ++kb) {
            const int buf = kb & 1;
            if (kb + 1 < kbs) stage(buf ^ 1, kb + 1);
            const T *Ks = X[buf][0], *Vs = X[buf][1];
            float s[ST][4], dp[ST][4];  // S and dP: 16 queries x 64 keys
            zero(s, ST);
            zero(dp, ST);
            mma_abt<T>(s, qa, Ks, lane);
            mma_abt<T>(dp, ga, Vs, lane);
            const bool edge = (causal && kb == qb) || (kb + 1) * BC > t;
#pragma unroll
            for (int n = 0; n < ST; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = kb * BC + n * 8 + 2 * tq + (e & 1), r = e >> 1;
                    const bool hide = edge && (key >= t || (causal && key > row0 + 8 * r));
                    const float p = hide ? 0.f : exp2f(s[n][e] * c - lr[r]);
                    dp[n][e] = p * (dp[n][e] - dr[r]);  // dS
                }
            mma_pb<T>(dq, dp, Ks, lane);
            cd_cp_wait<0>();
            __syncthreads();  // the next block has landed, and this one is read by every warp
        }
        store_rows(gqkv + (long long)b * t * pitch + h * HD, pitch, row0, t, dq, scale, scale,
                   lane);
    }
}

#ifdef CUDROP_INSTANTIATE
#define CD_INST(T)                                                                           \
    template __global__ void attn_fwd<T>(const T*, T*, float*, int, int, int, float);        \
    template __global__ void attn_bwd_dot<T>(const T*, const T*, float*, long long, int, int); \
    template __global__ void attn_bwd_dkdv<T>(const T*, const T*, const float*, const float*, \
                                              T*, int, int, int, float, float);              \
    template __global__ void attn_bwd_dq<T>(const T*, const T*, const float*, const float*,   \
                                            T*, int, int, int, float, float);
CD_INST(float)
CD_INST(double)
CD_INST(cd_f16)
CD_INST(cd_bf16)
#endif
