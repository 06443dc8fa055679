// Exact float32 block-sparse GEMM on the FP32 pipes (bsmm.cuh's contract): plain fmaf in
// float, no TF32, no fast-math: every multiply-add is one FFMA, rounded once, as in an SGEMM (the
// summation order differs, as between any two GEMMs).
//
// Register tiling. A CTA computes a BM x BN tile with BM*BN/64 threads; each thread owns an 8 x 8
// block of accumulators (64 floats in registers), which turns every shared-memory float4 read
// into 16 FMAs: per k a thread reads 2 float4 of A and 2 of B and does 64 FMAs. The thread's 8
// rows and 8 columns are not contiguous but 2 x 2 fragments of 4 x 4, 16 rows and 32 columns
// apart: a warp is 4 x 8 threads over a 32 x 64 warp tile, so the 8 lanes that share a row read
// 8 consecutive float4 of B (128 contiguous bytes: no two lanes in one bank at different
// addresses) and the 4 lane rows read 4 consecutive float4 of A (broadcast to the lanes that
// share them). Warps tile the CTA as (BM/32) x (BN/64).
//
// Shared memory holds each k-step as k-major rows: As[k][m] and Bs[k][n], so the inner loop
// reads a float4 along m (n) at fixed k for either major order of the operands in global
// memory. Rows are padded by 4 floats (BM + 4): an operand contiguous along k (K-major A, or a
// transposed B) is stored transposed, one float per store, and the warp's 16 rows x 2 k-halves
// then hit 32 different banks (the pad shifts k + 4 by 16 banks); the pad keeps rows 16-byte
// aligned for the float4 reads.
//
// Pipeline: two shared-memory buffers, one __syncthreads per k-step of BK = 8. The global loads
// of step s+1 go to registers before the FMAs of step s (their latency hides under the FMAs),
// and are stored to the other buffer after them. That buffer was last read in step s-1, which
// every thread finished before the barrier that ended it; the barrier that ends step s
// publishes the stores before step s+1 reads them. cp.async would free those staging
// registers, but it copies bytes as they lie and cannot transpose a K-major operand into the
// k-major rows the inner loop reads; register staging serves every layout with one code path.
//
// The k-walk is cd_kwalk over the kept reduction blocks of the tile's row block (or [0, K)):
// a step covers [k0, kend), kend - k0 <= BK, cut at the end of a kept block (block splitting:
// a block of any width, e.g. 5 or 13 columns, is exact). Loads are predicated on k < kend and
// on the row (column) being inside M (N); what is not loaded is stored as 0, so both factors of
// every padded product are 0 and the sum is unchanged (an unloaded A times a loaded B could be
// 0 * inf = NaN, so both operands are predicated on k).
//
// VEC: every 4-element chunk along an operand's contiguous axis is 16-byte aligned and wholly
// inside or outside its row/step, so it is one float4 load (the dispatcher checks: 16-byte
// aligned bases, lda and ldb multiples of 4, K and kblk multiples of 4 for a K-major operand,
// M (N) multiple of 4 for an M-major A (N-major B)). Otherwise each element is a predicated
// scalar load of the same chunk layout.
//
// Output pruning: cd_tile_kept (collective: every thread calls it before any divergence) skips
// a tile whose column range holds no kept block; it writes exact zeros. Inside a kept tile a
// dropped column writes an exact 0 (not act(bias)).
//
// Launch: block BM*BN/64 threads, 1-D grid of ceil(M/BM)*ceil(N/BN) CTAs, walked in groups of 8
// tile rows so that the CTAs resident together share panels of A and B in L2; static shared
// memory 2 * 8 * (BM + BN + 8) * 4 bytes. The dispatcher guarantees rblk % BM == 0 when lists or
// bits are given (the whole tile lies in one row block, so one list and one bit row serve it).
// __launch_bounds__ asks for 512 / threads CTAs per SM, i.e. at most 128 registers per thread
// (64 accumulators, 16 fragment floats, the staged loads and addresses).
#include "bsmm.cuh"

struct __align__(16) cd_f4 {
    float x, y, z, w;
};

// Guarded global loads that read nothing (and give zeros) when `ok` is false. Inline PTX,
// volatile: the compiler sank the plain C++ loads, which are consumed only after the FMAs, down
// to their use (seen in the sm_90a SASS: the next step's loads issued after most of the FMAs,
// their latency exposed); with volatile they are issued before the first FMA of the step.
__device__ __forceinline__ cd_f4 cd_ldg4(const float* p, bool ok) {
    cd_f4 v;
    asm volatile(
        "{\n .reg .pred q;\n setp.ne.b32 q, %5, 0;\n"
        " mov.b32 %0, 0;\n mov.b32 %1, 0;\n mov.b32 %2, 0;\n mov.b32 %3, 0;\n"
        " @q ld.global.nc.v4.f32 {%0, %1, %2, %3}, [%4];\n}\n"
        : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
        : "l"(p), "r"((int)ok));
    return v;
}
__device__ __forceinline__ float cd_ldg1(const float* p, bool ok) {
    float v;
    asm volatile(
        "{\n .reg .pred q;\n setp.ne.b32 q, %2, 0;\n mov.b32 %0, 0;\n"
        " @q ld.global.nc.f32 %0, [%1];\n}\n"
        : "=f"(v) : "l"(p), "r"((int)ok));
    return v;
}

// One operand's share of a k-step: the tile's R rows (A's m, or B's n) by BK k-columns, as
// chunks of 4 elements along the operand's contiguous axis, CH per thread. KMAJ: the operand is
// contiguous along k (chunk = (row, 4 k's)); else along its rows (chunk = (k, 4 rows)).
template <bool KMAJ, int R, int BK, int THREADS, bool VEC>
struct cd_ffma_loader {
    static constexpr int CPR = KMAJ ? BK / 4 : R / 4;  // chunks per contiguous line
    static constexpr int CH = R * BK / 4 / THREADS;
    static constexpr int LINES = THREADS / CPR;         // lines advanced per chunk index j
    static_assert(CH >= 1 && CH * THREADS * 4 == R * BK && THREADS % CPR == 0,
                  "the tile's chunks must spread evenly over the threads");
    const float* base;  // the thread's first chunk at k = 0
    long long ld;
    int line, off;      // line (row if KMAJ, else k) and element offset of chunk 0 in the tile
    int lim;            // KMAJ: rows of chunk j valid while line + j*LINES < lim; else the
                        // elements of a chunk inside the matrix (<= 0: none, >= 4: all)
    cd_f4 v[CH];

    __device__ __forceinline__ cd_ffma_loader(const float* X, long long ld_, int x0, int extent,
                                              int tid) {
        ld = ld_;
        line = tid / CPR;
        off = tid % CPR * 4;
        if (KMAJ) {
            base = X + (long long)(x0 + line) * ld + off;
            lim = extent - x0;
        } else {
            base = X + x0 + off;
            lim = extent - x0 - off;
        }
    }

    // global -> registers for the step [k0, kend)
    __device__ __forceinline__ void load(int k0, int kend) {
#pragma unroll
        for (int j = 0; j < CH; ++j) {
            if (KMAJ) {
                const bool row_ok = line + j * LINES < lim;
                const int k = k0 + off;
                const float* p = base + (long long)j * LINES * ld + k0;
                if (VEC) {
                    v[j] = cd_ldg4(p, row_ok && k < kend);
                } else {
                    v[j].x = cd_ldg1(p, row_ok && k < kend);
                    v[j].y = cd_ldg1(p + 1, row_ok && k + 1 < kend);
                    v[j].z = cd_ldg1(p + 2, row_ok && k + 2 < kend);
                    v[j].w = cd_ldg1(p + 3, row_ok && k + 3 < kend);
                }
            } else {
                const int k = k0 + line + j * LINES;
                const bool k_ok = k < kend;
                const float* p = base + (long long)k * ld;
                if (VEC) {
                    v[j] = cd_ldg4(p, k_ok && lim > 0);
                } else {
                    v[j].x = cd_ldg1(p, k_ok && lim > 0);
                    v[j].y = cd_ldg1(p + 1, k_ok && lim > 1);
                    v[j].z = cd_ldg1(p + 2, k_ok && lim > 2);
                    v[j].w = cd_ldg1(p + 3, k_ok && lim > 3);
                }
            }
        }
    }

    // registers -> one shared buffer laid out [BK][R + 4]
    __device__ __forceinline__ void store(float* s) const {
        constexpr int LD = R + 4;
#pragma unroll
        for (int j = 0; j < CH; ++j) {
            if (KMAJ) {  // transpose: the 4 k's of the chunk go to 4 rows of the buffer
                float* q = s + off * LD + line + j * LINES;
                q[0] = v[j].x;
                q[LD] = v[j].y;
                q[2 * LD] = v[j].z;
                q[3 * LD] = v[j].w;
            } else {
                *reinterpret_cast<cd_f4*>(s + (line + j * LINES) * LD + off) = v[j];
            }
        }
    }
};

// cd_kwalk's steps in order, without its division per step (walk.at divides by per_block): the
// cursor holds the next step's start and its block's end, and reads a block's start from the
// list when it enters the block, right after the loads of the step before, so that a k-step of
// FMAs hides the read. 32-bit state (k < K < 2^31), to leave registers to the accumulators.
struct cd_kcursor {
    int k0, bend, sub, blk, nblocks;
    __device__ __forceinline__ explicit cd_kcursor(const cd_kwalk& w) {
        sub = blk = 0;
        nblocks = w.per_block ? w.steps / w.per_block : 0;
        k0 = bend = 0;
        if (nblocks) enter(w);
    }
    __device__ __forceinline__ void enter(const cd_kwalk& w) {
        const long long start = w.list ? (long long)__ldg(w.list + blk) * w.kblk : 0;
        k0 = (int)start;
        bend = (int)min(start + w.kblk, (long long)w.K);
    }
    __device__ __forceinline__ void range(const cd_kwalk& w, int& k0_, int& kend) const {
        k0_ = k0;
        kend = min(k0 + w.bk, bend);
    }
    __device__ __forceinline__ void next(const cd_kwalk& w) {
        k0 += w.bk;
        if (++sub == w.per_block) {
            sub = 0;
            if (++blk < nblocks) enter(w);
        }
    }
};

template <bool A_KMAJ, bool B_KMAJ, int BM, int BN, bool VEC>
__global__ void __launch_bounds__(BM * BN / 64, 32768 / (BM * BN))
    bsmm_ffma(CD_BSMM_PARAMS(float)) {
    constexpr int BK = 8, THREADS = BM * BN / 64, WN = BN / 64;
    constexpr int LDA = BM + 4, LDB = BN + 4;
    static_assert(BM % 32 == 0 && BN % 64 == 0, "warp tiles are 32 x 64");
    __shared__ __align__(16) float As[2][BK * LDA];
    __shared__ __align__(16) float Bs[2][BK * LDB];

    int m0, n0;
    cd_grouped_tile(M, N, BM, BN, m0, n0);
    const int r = (count || bits) ? m0 / rblk : 0;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    // this thread's rows tm + {0..3, 16..19} and columns tn + {0..3, 32..35} of the tile
    const int tm = warp / WN * 32 + (lane >> 3) * 4, tn = warp % WN * 64 + (lane & 7) * 4;

    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;

    const bool tile_kept = cd_tile_kept(bits, bits_stride, r, n0, min(n0 + BN, N), cblk);
    if (tile_kept) {
        const cd_kwalk walk(count, index, index_stride, r, kblk, K, BK);
        cd_ffma_loader<A_KMAJ, BM, BK, THREADS, VEC> la(A, lda, m0, M, tid);
        cd_ffma_loader<B_KMAJ, BN, BK, THREADS, VEC> lb(B, ldb, n0, N, tid);
        cd_kcursor pos(walk);  // the next step to load
        int k0, kend;
        if (walk.steps > 0) {
            pos.range(walk, k0, kend);
            la.load(k0, kend);
            lb.load(k0, kend);
            la.store(As[0]);
            lb.store(Bs[0]);
            pos.next(walk);
        }
        __syncthreads();
        for (int s = 0; s < walk.steps; ++s) {  // steps is uniform: the barriers are too
            const int buf = s & 1;
            const bool more = s + 1 < walk.steps;
            // step s+1's loads, issued before step s's FMAs and stored after them; past the
            // last step an empty range loads nothing
            if (more) pos.range(walk, k0, kend);
            else k0 = kend = 0;
            la.load(k0, kend);
            lb.load(k0, kend);
            if (more) pos.next(walk);
            const float* as = As[buf] + tm;
            const float* bs = Bs[buf] + tn;
#pragma unroll
            for (int kk = 0; kk < BK; ++kk) {
                const cd_f4 a0 = *reinterpret_cast<const cd_f4*>(as + kk * LDA);
                const cd_f4 a1 = *reinterpret_cast<const cd_f4*>(as + kk * LDA + 16);
                const cd_f4 b0 = *reinterpret_cast<const cd_f4*>(bs + kk * LDB);
                const cd_f4 b1 = *reinterpret_cast<const cd_f4*>(bs + kk * LDB + 32);
                const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
                const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
                for (int i = 0; i < 8; ++i)
#pragma unroll
                    for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
            }
            if (more) {
                la.store(As[buf ^ 1]);
                lb.store(Bs[buf ^ 1]);
            }
            __syncthreads();
        }
    }

    // Epilogue: column facts once per thread (8 columns), then 8 rows of two 4-column chunks,
    // each one float4 store where C's rows are contiguous and 16-byte aligned.
    const float alpha_f = (float)alpha;
    float bias_v[8];
    unsigned keep = 0;  // bit j: column tn + (j & 3) + (j >> 2) * 32 is written with a value
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int n = n0 + tn + (j & 3) + (j >> 2) * 32;
        const bool in = n < N;
        bias_v[j] = bias && in ? bias[n] : 0.f;
        const bool kept = tile_kept && in && (!bits || cd_bit(bits, bits_stride, r, n / cblk));
        keep |= (unsigned)kept << j;
    }
    const bool vec_c = ldcn == 1 && (ldcm & 3) == 0 && ((unsigned long long)C & 15) == 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int m = m0 + tm + (i & 3) + (i >> 2) * 16;
        if (m >= M) continue;
        float* crow = C + (long long)m * ldcm;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int n = n0 + tn + h * 32;
            float v[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = h * 4 + e;
                v[e] = keep >> j & 1 ? cd_activate(alpha_f * acc[i][j] + bias_v[j], act) : 0.f;
            }
            if (vec_c && n + 3 < N) {
                *reinterpret_cast<cd_f4*>(crow + n) = cd_f4{v[0], v[1], v[2], v[3]};
            } else {
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    if (n + e < N) crow[(long long)(n + e) * ldcn] = v[e];
            }
        }
    }
}

#ifdef CUDROP_INSTANTIATE
#define CD_INST_TILE(AK, BK_, BM, BN)                                                        \
    template __global__ void bsmm_ffma<AK, BK_, BM, BN, true>(CD_BSMM_PARAMS(float));        \
    template __global__ void bsmm_ffma<AK, BK_, BM, BN, false>(CD_BSMM_PARAMS(float));
#define CD_INST_LAYOUT(AK, BK_)        \
    CD_INST_TILE(AK, BK_, 128, 128)    \
    CD_INST_TILE(AK, BK_, 64, 128)     \
    CD_INST_TILE(AK, BK_, 64, 64)
CD_INST_LAYOUT(true, false)
CD_INST_LAYOUT(true, true)
CD_INST_LAYOUT(false, false)
CD_INST_LAYOUT(false, true)
#endif
