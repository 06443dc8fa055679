// The portable tensor-core block-sparse GEMM (bsmm.cuh's contract), sm_80 and newer: float16
// and bfloat16 (mma.sync.m16n8k16) and float32 on TF32 (m16n8k8, operands rounded to TF32 with
// cvt.rna), float32 accumulation; fed by ldmatrix from swizzled
// shared memory, a STAGES-deep cp.async pipeline over the k-walk of the tile's row block (so a
// dropped K-block costs neither load nor multiply), and a tile skipped whole when the output
// mask drops every block it covers.
//
// Launch: block WM*WN*32 threads, 1-D grid of ceil(M/BM)*ceil(N/BN) CTAs (grouped by 8 tile
// rows for L2 reuse), dynamic shared memory STAGES*(BM+BN)*BK*sizeof(T) bytes. BK counts
// elements (32 for 16-bit types is 64 bytes a row; use 16 for float).
// The dispatcher guarantees, with E = 16 / sizeof(T) elements per 16-byte chunk: rblk % BM == 0
// when lists or bits are given; K % E == 0 when an operand is K-major; M % E == 0 for an M-major
// A and N % E == 0 for an N-major B; lda, ldb multiples of E and 16-byte aligned bases (every
// chunk is wholly in range or out); kblk % E == 0 with lists.
#include "bsmm.cuh"
#include "mma.cuh"

// Byte offset of 16-byte chunk c of row `row` in a tile of W chunks per row. The XOR spreads
// the 8 rows one ldmatrix reads at a fixed chunk over all 8 bank groups; 64-byte rows (W = 4)
// pair up into 128-byte lines and swizzle by line.
template <int W> __device__ __forceinline__ int cd_swz(int row, int c) {
    if (W >= 8) return (row * W + (c ^ (row & 7))) * 16;
    const int L = row * W + c;
    return ((L & ~7) | ((L ^ (L >> 3)) & 7)) * 16;
}

// Float (row, col) of a swizzled tile of W 4-float chunks per row, from shared address `base`.
template <int W> __device__ __forceinline__ unsigned cd_word(unsigned base, int row, int col) {
    unsigned v;
    asm volatile("ld.shared.b32 %0, [%1];"
                 : "=r"(v) : "r"(base + cd_swz<W>(row, col >> 2) + (col & 3) * 4));
    return v;
}

template <typename T, bool A_KMAJ, bool B_KMAJ, int BM, int BN, int BK, int WM, int WN,
          int STAGES>
__global__ void __launch_bounds__(WM * WN * 32) bsmm_mma(CD_BSMM_PARAMS(T)) {
    constexpr int E = 16 / sizeof(T);              // elements per 16-byte chunk
    constexpr int MK = 2 * E;                      // the mma's k: 16 (16-bit) or 8 (TF32)
    constexpr int THREADS = WM * WN * 32, KS = BK / MK;
    constexpr int TM = BM / WM, TN = BN / WN, MI = TM / 16, NI = TN / 8;
    constexpr int A_ELEMS = BM * BK, B_ELEMS = BN * BK;
    constexpr int A_BYTES = A_ELEMS * sizeof(T), B_BYTES = B_ELEMS * sizeof(T);
    constexpr int AW = A_KMAJ ? BK / E : BM / E, BW = B_KMAJ ? BK / E : BN / E;  // chunks/row
    static_assert(MI >= 1 && NI % 2 == 0 && KS >= 1, "warp tile must be a multiple of 16 x 16");
    extern __shared__ __align__(128) unsigned char cd_smem[];
    unsigned char* As = cd_smem;
    unsigned char* Bs = cd_smem + STAGES * A_BYTES;

    int m0, n0;
    cd_grouped_tile(M, N, BM, BN, m0, n0);
    const int r = (count || bits) ? m0 / rblk : 0;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm0 = warp / WN * TM, wn0 = warp % WN * TN;

    float acc[MI][NI][4];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    const bool tile_kept = cd_tile_kept(bits, bits_stride, r, n0, min(n0 + BN, N), cblk);
    if (tile_kept) {
        // The k-walk: the kept reduction blocks of this row block (or [0, K) as one block), each
        // ceil(kblk / BK) steps of BK columns. The loader walks it incrementally (no division
        // per step) and reads the next block's index one block ahead.
        const int nblocks = count ? count[r] : 1;
        const int* list = count ? index + (long long)r * index_stride : nullptr;
        const int bw = count ? kblk : K;
        const int per_block = (bw + BK - 1) / BK, steps = nblocks * per_block;
        int ld_b = 0, ld_sub = 0, ld_stage = 0;
        long long ld_start = list && nblocks ? (long long)__ldg(list) * bw : 0;

        // This thread's 16-byte chunks of each stage: shared offset, global base, the chunk's
        // k offset and whether its row/column is inside M/N, all fixed across the walk.
        constexpr int A_CH = A_ELEMS / E / THREADS, B_CH = B_ELEMS / E / THREADS;
        static_assert(A_CH * THREADS * E == A_ELEMS && B_CH * THREADS * E == B_ELEMS,
                      "tile chunks must spread evenly over the threads");
        int a_src[A_CH], a_dst[A_CH], a_k[A_CH];  // 32-bit offsets from the tile's corner
        int b_src[B_CH], b_dst[B_CH], b_k[B_CH];
        unsigned a_ok = 0, b_ok = 0;                // bit j: chunk j's row/column is inside
#pragma unroll
        for (int j = 0; j < A_CH; ++j) {
            const int i = tid + j * THREADS, row = i / AW, c = i % AW;
            a_dst[j] = cd_swz<AW>(row, c);
            a_src[j] = row * (int)lda + c * E;
            a_k[j] = A_KMAJ ? c * E : row;
            a_ok |= (unsigned)(A_KMAJ ? m0 + row < M : m0 + c * E < M) << j;
        }
#pragma unroll
        for (int j = 0; j < B_CH; ++j) {
            const int i = tid + j * THREADS, row = i / BW, c = i % BW;
            b_dst[j] = cd_swz<BW>(row, c);
            b_src[j] = row * (int)ldb + c * E;
            b_k[j] = B_KMAJ ? c * E : row;
            b_ok |= (unsigned)(B_KMAJ ? n0 + row < N : n0 + c * E < N) << j;
        }
        const T* a_tile = A + (A_KMAJ ? (long long)m0 * lda : m0);
        const T* b_tile = B + (B_KMAJ ? (long long)n0 * ldb : n0);
        const unsigned as0 = cd_smem_addr(As), bs0 = cd_smem_addr(Bs);

        auto load_next = [&]() {
            const int k0 = (int)(ld_start + ld_sub * BK);
            const int kend = (int)min(min(ld_start + bw, (long long)K), (long long)k0 + BK);
            const unsigned as = as0 + ld_stage * A_BYTES, bs = bs0 + ld_stage * B_BYTES;
            const T* a_k0 = a_tile + (A_KMAJ ? (long long)k0 : (long long)k0 * lda);
            const T* b_k0 = b_tile + (B_KMAJ ? (long long)k0 : (long long)k0 * ldb);
#pragma unroll
            for (int j = 0; j < A_CH; ++j) {
                const bool ok = (a_ok >> j & 1) && k0 + a_k[j] < kend;
                cd_cp_async16(as + a_dst[j], ok ? a_k0 + a_src[j] : A, ok);
            }
#pragma unroll
            for (int j = 0; j < B_CH; ++j) {
                const bool ok = (b_ok >> j & 1) && k0 + b_k[j] < kend;
                cd_cp_async16(bs + b_dst[j], ok ? b_k0 + b_src[j] : B, ok);
            }
            ld_stage = ld_stage + 1 == STAGES ? 0 : ld_stage + 1;
            if (++ld_sub == per_block) {
                ld_sub = 0;
                if (++ld_b < nblocks) ld_start = (long long)__ldg(list + ld_b) * bw;
            }
        };

        // ldmatrix addresses within a stage, per mma k-slice: loop-invariant, computed once.
        // ldmatrix serves K-major operands of any type and transposed 16-bit ones; a transposed
        // float operand (no 32-bit ldmatrix.trans) is read one word at a time (cd_word).
        const int i4 = lane >> 3, l8 = lane & 7, g = lane >> 2, q = lane & 3;
        constexpr bool A_WORDS = !A_KMAJ && E == 4, B_WORDS = !B_KMAJ && E == 4;
        int a_off[MI][KS], b_off[NI / 2][KS];
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {  // matrices (m 0-7 | 8-15) x (k lo | k hi)
                const int mrow = wm0 + mi * 16;
                a_off[mi][ks] = A_KMAJ ? cd_swz<AW>(mrow + (lane & 15), ks * 2 + (lane >> 4))
                                       : cd_swz<AW>(ks * 16 + (i4 >> 1) * 8 + l8,
                                                    mrow / 8 + (i4 & 1));
            }
#pragma unroll
            for (int nj = 0; nj < NI / 2; ++nj) {  // (n-tile 0: k lo, k hi), (n-tile 1: ...)
                const int ncol = wn0 + nj * 16;
                b_off[nj][ks] = B_KMAJ ? cd_swz<BW>(ncol + (i4 >> 1) * 8 + l8, ks * 2 + (i4 & 1))
                                       : cd_swz<BW>(ks * 16 + (i4 & 1) * 8 + l8,
                                                    ncol / 8 + (i4 >> 1));
            }
        }

#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) {
            if (s < steps) load_next();
            cd_cp_commit();
        }
        int stage = 0;
        for (int s = 0; s < steps; ++s) {
            cd_cp_wait<STAGES - 2>();
            __syncthreads();  // stage s landed for everyone; stage s-1 is free to refill
            if (s + STAGES - 1 < steps) load_next();
            cd_cp_commit();
            const unsigned as = as0 + stage * A_BYTES, bs = bs0 + stage * B_BYTES;
            stage = stage + 1 == STAGES ? 0 : stage + 1;
#pragma unroll
            for (int ks = 0; ks < KS; ++ks) {
                unsigned af[MI][4], bf[NI][2];
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) {
                    if (A_WORDS) {  // (m, k), (m+8, k), (m, k+4), (m+8, k+4) of a [k][m] tile
                        const int k = ks * 8 + q, m = wm0 + mi * 16 + g;
                        af[mi][0] = cd_word<AW>(as, k, m);
                        af[mi][1] = cd_word<AW>(as, k, m + 8);
                        af[mi][2] = cd_word<AW>(as, k + 4, m);
                        af[mi][3] = cd_word<AW>(as, k + 4, m + 8);
                    } else {
                        cd_ldsm_x4<!A_KMAJ>(af[mi], as + a_off[mi][ks]);
                    }
#pragma unroll
                    for (int e = 0; e < 4; ++e) af[mi][e] = cd_frag<T>(af[mi][e]);
                }
#pragma unroll
                for (int nj = 0; nj < NI / 2; ++nj) {
                    unsigned t[4];
                    if (B_WORDS) {  // (k, n), (k+4, n) of n-tiles 2nj and 2nj+1 of a [k][n] tile
                        const int k = ks * 8 + q, n = wn0 + nj * 16 + g;
                        t[0] = cd_word<BW>(bs, k, n);
                        t[1] = cd_word<BW>(bs, k + 4, n);
                        t[2] = cd_word<BW>(bs, k, n + 8);
                        t[3] = cd_word<BW>(bs, k + 4, n + 8);
                    } else {
                        cd_ldsm_x4<!B_KMAJ>(t, bs + b_off[nj][ks]);
                    }
                    bf[2 * nj][0] = cd_frag<T>(t[0]); bf[2 * nj][1] = cd_frag<T>(t[1]);
                    bf[2 * nj + 1][0] = cd_frag<T>(t[2]); bf[2 * nj + 1][1] = cd_frag<T>(t[3]);
                }
#pragma unroll
                for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                    for (int ni = 0; ni < NI; ++ni) cd_mma<T>(acc[mi][ni], af[mi], bf[ni]);
            }
        }
        cd_cp_wait<0>();
    }

    const int g = lane >> 2, q = lane & 3;  // the accumulator fragment's row and column pair
    const float alpha_f = (float)alpha;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int m = m0 + wm0 + mi * 16 + g + (e >> 1) * 8;
                const int n = n0 + wn0 + ni * 8 + q * 2 + (e & 1);
                if (m < M && n < N) {
                    float v = 0.f;
                    if (tile_kept && (!bits || cd_bit(bits, bits_stride, r, n / cblk)))
                        v = cd_activate(alpha_f * acc[mi][ni][e] + (bias ? cd_load(bias[n]) : 0.f),
                                        act);
                    C[(long long)m * ldcm + (long long)n * ldcn] = cd_from_float<T>(v);
                }
            }
}

#ifdef CUDROP_INSTANTIATE
#define CD_INST_TILE(T, AK, BK_, BM, BN, BK, WM, WN, S) \
    template __global__ void bsmm_mma<T, AK, BK_, BM, BN, BK, WM, WN, S>(CD_BSMM_PARAMS(T));
#define CD_INST_LAYOUT(T, AK, BK_)                      \
    CD_INST_TILE(T, AK, BK_, 64, 128, 32, 2, 2, 4)      \
    CD_INST_TILE(T, AK, BK_, 128, 128, 64, 2, 4, 3)     \
    CD_INST_TILE(T, AK, BK_, 128, 128, 32, 2, 4, 4)
#define CD_INST(T)                 \
    CD_INST_LAYOUT(T, true, false) \
    CD_INST_LAYOUT(T, true, true)  \
    CD_INST_LAYOUT(T, false, false)
CD_INST(cd_f16)
CD_INST(cd_bf16)
#define CD_INST_TF32(AK, BK_) CD_INST_TILE(float, AK, BK_, 64, 128, 16, 2, 2, 4)
CD_INST_TF32(true, false)
CD_INST_TF32(true, true)
CD_INST_TF32(false, false)
#endif
