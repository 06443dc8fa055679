// Hopper (sm_90a) helpers of the wgmma block-sparse GEMMs (bsmm_sm90.cu, bsmm_tma.cu): tile
// configuration, cp.async and mbarrier wrappers, wgmma descriptors and wrappers, the swizzled
// tile loads and the epilogue. BSMM90_ENABLED is 1 only when compiling for sm_90a; the kernels
// compile to empty bodies elsewhere.
#pragma once
#include "dtypes.cuh"



template <int BM, int BN, int STAGES, int BK>
struct bsmm90_cfg {
    static constexpr int THREADS = (BM / 64) * 128;
    static constexpr int A_BYTES = BM * BK * 2;
    static constexpr int B_BYTES = BN * BK * 2;
    static constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
    static constexpr int SMEM_BYTES = STAGES * STAGE_BYTES + 1024;
};

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define BSMM90_ENABLED 1
#else
#define BSMM90_ENABLED 0
#endif

#if BSMM90_ENABLED


__device__ __forceinline__ unsigned bsmm90_smem_u32(const void* p) {
    unsigned long long a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (unsigned)a;
}
__device__ __forceinline__ void bsmm90_cp16(unsigned dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void bsmm90_cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void bsmm90_cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
}
__device__ __forceinline__ void bsmm90_fence_proxy() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void bsmm90_wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void bsmm90_wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void bsmm90_wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory");
}
__device__ __forceinline__ void bsmm90_reg_fence(float& x) { asm volatile("" : "+f"(x) :: "memory"); }

// Shared-memory matrix descriptor; mode 1 = 128-byte swizzle, 2 = 64-byte swizzle.
__device__ __forceinline__ unsigned long long bsmm90_desc(unsigned addr, unsigned lbo, unsigned sbo,
                                                          unsigned long long mode) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4)
         | ((unsigned long long)((lbo >> 4) & 0x3FFF) << 16)
         | ((unsigned long long)((sbo >> 4) & 0x3FFF) << 32)
         | (mode << 62);
}

// Position p of the compacted kept-k sequence -> k index, or -1 (zero-fill).
__device__ __forceinline__ int bsmm90_kmap(int p, int K, bool dense, int cnt, const int* idx, int kblk) {
    if (dense) return p < K ? p : -1;
    int b = p / kblk;
    if (b >= cnt) return -1;
    int k = __ldg(idx + b) * kblk + (p - b * kblk);
    return k < K ? k : -1;
}

// K-major tile: ROWS rows (m or n) x BK k. BK=64: rows 128 B apart, 16-B chunk c of row r stored
// at chunk (c ^ (r & 7)) (128-byte swizzle); BK=32: rows 64 B apart, chunk c at (c ^ ((r>>1) & 3))
// (64-byte swizzle).  G(row, k) = G[row*ld + k].  Chunk id = tid + i*THREADS: c = id % CPR,
// r = id / CPR (THREADS % 8 == 0, so c is fixed per thread and one k lookup serves all rows).
template <int ROWS, int THREADS, int BK>
__device__ __forceinline__ void bsmm90_load_kmaj(unsigned sbase, const unsigned short* G, long long ld,
                                                 int row0, int rows, int step, int K, bool dense,
                                                 int cnt, const int* idx, int kblk, int tid) {
    constexpr int CPR = BK / 8;
    constexpr int RB = BK * 2;                // row bytes
    constexpr int RPP = THREADS / CPR;        // rows per pass (multiple of 8)
    constexpr int TOTAL = ROWS * CPR;
    constexpr int ITERS = (TOTAL + THREADS - 1) / THREADS;
    const int c = tid % CPR;
    const int k = bsmm90_kmap(step * BK + c * 8, K, dense, cnt, idx, kblk);
    const int r0 = tid / CPR;
    const int sc = (BK == 64) ? (c ^ (r0 & 7)) : (c ^ ((r0 >> 1) & 3));
    const unsigned soff = sbase + (unsigned)(r0 * RB) + (unsigned)(sc << 4);
    const unsigned short* src = G + (long long)(row0 + r0) * ld + (k < 0 ? 0 : k);
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
        if (TOTAL % THREADS != 0 && tid + i * THREADS >= TOTAL) break;
        const int r = r0 + i * RPP;
        const bool v = (k >= 0) && (row0 + r < rows);
        bsmm90_cp16(soff + (unsigned)(i * RPP * RB),
                    v ? (const void*)(src + (long long)i * RPP * ld) : (const void*)G, v);
    }
}

// MN-major tile: BK k rows x ROWS mn, stored as ROWS/64 atoms (64 mn wide, BK*128 B each); inside
// an atom, k row kr is 128 B at kr*128 with chunk c stored at (c ^ (kr & 7)).  G(k, row) = G[k*ld + row].
template <int ROWS, int THREADS, int BK>
__device__ __forceinline__ void bsmm90_load_mnmaj(unsigned sbase, const unsigned short* G, long long ld,
                                                  int row0, int rows, int step, int K, bool dense,
                                                  int cnt, const int* idx, int kblk, int tid) {
    constexpr int CPR = ROWS / 8;             // chunks per k row
    constexpr int TOTAL = BK * CPR;
    constexpr int ITERS = (TOTAL + THREADS - 1) / THREADS;
    constexpr bool FIXED_MC = (THREADS % CPR) == 0;
    int kk[ITERS];
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {         // all k lookups first: independent loads in flight
        const int id = tid + i * THREADS;
        kk[i] = (id < TOTAL) ? bsmm90_kmap(step * BK + id / CPR, K, dense, cnt, idx, kblk) : -1;
    }
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
        const int id = tid + i * THREADS;
        if (TOTAL % THREADS != 0 && id >= TOTAL) break;
        const int mc = FIXED_MC ? (tid % CPR) : (id % CPR);
        const int kr = id / CPR;
        const int c = mc & 7;
        const bool v = (row0 + mc * 8 < rows) && (kk[i] >= 0);
        const unsigned dst = sbase + (unsigned)((mc >> 3) * (BK * 128)) + (unsigned)(kr * 128)
                           + (unsigned)((c ^ (kr & 7)) << 4);
        bsmm90_cp16(dst, v ? (const void*)(G + (long long)kk[i] * ld + row0 + mc * 8) : (const void*)G, v);
    }
}

// The accumulator operands of wgmma m64n128 / m64n256 (the latter extends the former).
#define BSMM90_N128_REGS \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define BSMM90_N256_REGS BSMM90_N128_REGS ", " \
    "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
    "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
    "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
    "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define BSMM90_N128_OUTS \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
    "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
    "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
    "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
    "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
    "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define BSMM90_N256_OUTS BSMM90_N128_OUTS, \
    "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
    "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
    "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
    "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
    "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
    "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
    "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
    "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])

// d (BN/2 accumulators per thread) += A(desc) * B(desc) for one k16 slice; TA/TB = 1 for an
// MN-major operand.
#define BSMM90_WGMMA(SHAPE, TY, REGS, OUTS, IN)                                                 \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                    \
                 "wgmma.mma_async.sync.aligned." SHAPE ".f32." TY "." TY " {" REGS "}, " IN    \
                 ";\n}\n" : OUTS : "l"(da), "l"(db), "n"(TA), "n"(TB))
template <bool BF16, int BN, int TA, int TB>
__device__ __forceinline__ void bsmm90_wgmma(float* d, unsigned long long da, unsigned long long db) {
    if constexpr (BN == 256 && BF16)
        BSMM90_WGMMA("m64n256k16", "bf16", BSMM90_N256_REGS, BSMM90_N256_OUTS, "%128, %129, p, 1, 1, %130, %131");
    else if constexpr (BN == 256)
        BSMM90_WGMMA("m64n256k16", "f16", BSMM90_N256_REGS, BSMM90_N256_OUTS, "%128, %129, p, 1, 1, %130, %131");
    else if constexpr (BF16)
        BSMM90_WGMMA("m64n128k16", "bf16", BSMM90_N128_REGS, BSMM90_N128_OUTS, "%64, %65, p, 1, 1, %66, %67");
    else
        BSMM90_WGMMA("m64n128k16", "f16", BSMM90_N128_REGS, BSMM90_N128_OUTS, "%64, %65, p, 1, 1, %66, %67");
}

// One pipeline stage of MMAs for a warpgroup: the BK/16 k16 slices of the stage's shared tiles
// (A at sa, B at sb, in the layouts the loaders write) as one wgmma group, then a wait for the
// previous group, whose stage the caller may then refill or release. Descriptor strides: K-major
// rows of BK*2 bytes in 8-row atoms (128-byte swizzle for BK = 64, 64-byte for 32); MN-major
// 64-wide atoms of BK*128 bytes, 8 k-rows per 1024 bytes (128-byte swizzle).
template <bool BF16, bool A_KMAJ, bool B_KMAJ, int BN, int BK>
__device__ __forceinline__ void bsmm90_mma_stage(float* acc, unsigned sa, unsigned sb) {
    constexpr int NACC = BN / 2;
    constexpr unsigned ATOM_MN = BK * 128, KROW = BK * 2;
    constexpr unsigned long long KMODE = BK == 64 ? 1ull : 2ull;
    constexpr unsigned A_LBO = A_KMAJ ? 16u : ATOM_MN, A_SBO = A_KMAJ ? 8 * KROW : 1024u;
    constexpr unsigned B_LBO = B_KMAJ ? 16u : ATOM_MN, B_SBO = B_KMAJ ? 8 * KROW : 1024u;
    constexpr unsigned long long A_MODE = A_KMAJ ? KMODE : 1ull, B_MODE = B_KMAJ ? KMODE : 1ull;
    constexpr unsigned A_KSTEP = A_KMAJ ? 32u : 2048u, B_KSTEP = B_KMAJ ? 32u : 2048u;
#pragma unroll
    for (int i = 0; i < NACC; ++i) bsmm90_reg_fence(acc[i]);
    bsmm90_wg_fence();
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk)
        bsmm90_wgmma<BF16, BN, A_KMAJ ? 0 : 1, B_KMAJ ? 0 : 1>(
            acc, bsmm90_desc(sa + kk * A_KSTEP, A_LBO, A_SBO, A_MODE),
            bsmm90_desc(sb + kk * B_KSTEP, B_LBO, B_SBO, B_MODE));
    bsmm90_wg_commit();
#pragma unroll
    for (int i = 0; i < NACC; ++i) bsmm90_reg_fence(acc[i]);
    bsmm90_wg_wait<1>();
#pragma unroll
    for (int i = 0; i < NACC; ++i) bsmm90_reg_fence(acc[i]);
}

// The epilogue of one warpgroup's 64 rows of a BN-wide tile (the m64nNk16 accumulator
// fragment: thread (warp w, lane l) holds rows 16w + l/4 (+8) and columns 8j + 2(l%4) (+1) in
// acc[4j + {0,1,2,3}]): alpha, bias, activation, the output mask's exact zeros, predicated stores
// (4-byte pairs where aligned).
template <typename T, int ACT, int BN>
__device__ __forceinline__ void bsmm90_epilogue(const float* acc, T* C, const T* bias, int M, int N,
                                                long long ldc, float alpha,
                                                const unsigned long long* brow, int cblk,
                                                int row_a, int col_a) {
    unsigned short* Cg = reinterpret_cast<unsigned short*>(C);
    const bool pair_ok = (ldc & 1) == 0;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
        const int n = col_a + 8 * j;
        if (n >= N) continue;
        const bool has1 = n + 1 < N;
        bool keep0 = true, keep1 = true;
        if (brow != nullptr) {
            const int c0 = n / cblk;
            keep0 = (brow[c0 >> 6] >> (c0 & 63)) & 1ull;
            if (has1) { const int c1 = (n + 1) / cblk; keep1 = (brow[c1 >> 6] >> (c1 & 63)) & 1ull; }
        }
        float b0 = 0.f, b1 = 0.f;
        if (bias != nullptr) { b0 = cd_to_float(bias[n]); if (has1) b1 = cd_to_float(bias[n + 1]); }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int m = row_a + 8 * h;
            if (m >= M) continue;
            float v0 = alpha * acc[4 * j + 2 * h] + b0;
            float v1 = alpha * acc[4 * j + 2 * h + 1] + b1;
            if constexpr (ACT == 1) { v0 = fmaxf(v0, 0.f); v1 = fmaxf(v1, 0.f); }
            else if constexpr (ACT == 2) {
                v0 = 0.5f * v0 * (1.f + erff(v0 * 0.70710678118654752f));
                v1 = 0.5f * v1 * (1.f + erff(v1 * 0.70710678118654752f));
            }
            const unsigned short o0 = keep0 ? cd_from_float<T>(v0).v : (unsigned short)0;
            const unsigned short o1 = keep1 ? cd_from_float<T>(v1).v : (unsigned short)0;
            unsigned short* dst = Cg + (long long)m * ldc + n;
            if (has1 && pair_ok) {
                *reinterpret_cast<unsigned int*>(dst) = (unsigned int)o0 | ((unsigned int)o1 << 16);
            } else {
                dst[0] = o0;
                if (has1) dst[1] = o1;
            }
        }
    }
}

#endif  // BSMM90_ENABLED
