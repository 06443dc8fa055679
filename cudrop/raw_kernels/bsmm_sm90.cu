// bsmm_sm90: Hopper (sm_90a) block-sparse GEMM on the tensor cores through wgmma.mma_async.
//
//   C[m, n] = act(alpha * sum_k A(m, k) B(k, n) + bias[n])      fp16 / bf16 in, fp32 accumulate
//
// Same contract as the portable mma.sync kernel (bsmm.cuh; history in benchmarks/bsmm_notes.md):
//   * A(m,k) = A_KMAJ ? A[m*lda + k] : A[k*lda + m];  B(k,n) = B_KMAJ ? B[n*ldb + k] : B[k*ldb + n]
//   * count != nullptr: row block r = m / rblk sums only over the kept K blocks
//     index[r*index_stride + 0 .. count[r]-1] (each [j*kblk, min((j+1)*kblk, K)), kblk % 8 == 0)
//   * bits != nullptr: element (m, n) kept iff bit (n / cblk) of bits[(m / rblk)*bits_stride + ..]
//     is set; dropped elements are written as exact 0; a tile whose columns are all dropped
//     skips its GEMM.
//   * ACT: 0 none, 1 relu, 2 gelu (erf).
//
// Template parameters:  T (cd_f16 | cd_bf16), A_KMAJ, B_KMAJ, ACT,
//                       BM (64, 128 or 192: BM/64 warpgroups, each owns 64 rows),
//                       BN (128 or 256: the wgmma N), STAGES (>= 3 ring slots), BK (64 default, or 32).
// Measured best (H200, 4096^3/8192^3 fp16+bf16): BM=128,BN=256,STAGES=4,BK=64 (4096) and
//               BM=192,BN=256,STAGES=8,BK=32 (8192; needs rblk % 192 == 0 when sparse).
// Launch (bsmm_sm90):
//   block = (BM/64)*128 threads (1-D)
//   grid  = (ceil(N/BN), ceil(M/BM), 1)   (the kernel remaps the linear block id into groups of 8
//                                          M tiles for L2 reuse; any grid of this shape is fine)
//   dynamic shared memory = STAGES*(BM+BN)*BK*2 + 1024 bytes
//       (128x256 s4 k64: 197632; 192x256 s8 k32: 230400; 128x128 s6 k64: 197632)
//     -> set cudaFuncAttributeMaxDynamicSharedMemorySize (cupy: max_dynamic_shared_size_bytes).
//   Requires: rblk % BM == 0 when count or bits is given; K % 8 == 0 when A or B is K-major;
//             M % 8 == 0 when A is M-major; N % 8 == 0 when B is N-major; lda/ldb % 8 == 0;
//             A, B 16-byte aligned. C, bias: 2-byte aligned (ldc any).
//
// Design: all threads copy tiles global -> shared with 16-byte cp.async (zero-fill for any chunk
// outside M/N/K or outside a kept block) into the 128-byte-swizzle canonical layouts of wgmma
// (K-major: 128-byte rows of 64 k, 8-row atoms of 1024 B; MN-major: 128-byte rows of 64 m/n for
// one k, 8 k-rows per 1024 B atom, 64-wide MN atoms BK*128 B apart). The reduction walks the
// *compacted* list of kept k values: step s covers positions [64 s, 64 s + 64) of the
// concatenation of the kept blocks, so small kblk wastes no tensor-core work. Ring of STAGES
// slots, STAGES-2 steps of prefetch, one wgmma group kept in flight per warpgroup.
#include "sm90.cuh"

template <typename T, bool A_KMAJ, bool B_KMAJ, int ACT, int BM, int BN, int STAGES, int BK = 64>
__global__ void __launch_bounds__((BM / 64) * 128, 1)
bsmm_sm90(const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ C, const T* __restrict__ bias,
          int M, int N, int K, long long lda, long long ldb, long long ldc, float alpha,
          const int* __restrict__ count, const int* __restrict__ index, int index_stride, int rblk, int kblk,
          const unsigned long long* __restrict__ bits, int bits_stride, int cblk) {
    static_assert(BM == 64 || BM == 128 || BM == 192, "BM must be 64, 128 or 192");
    static_assert(BN == 128 || BN == 256, "BN must be 128 or 256");
    static_assert(STAGES >= 3, "STAGES >= 3");
    static_assert(BK == 64 || BK == 32, "BK must be 64 or 32");
#if BSMM90_ENABLED
    using cfg = bsmm90_cfg<BM, BN, STAGES, BK>;
    constexpr int THREADS = cfg::THREADS;
    constexpr bool BF16 = cd_is_bf16<T>::value;
    constexpr int NACC = BN / 2;

    extern __shared__ unsigned char bsmm90_smem_raw[];
    const unsigned sraw = bsmm90_smem_u32(bsmm90_smem_raw);
    const unsigned sbase = (sraw + 1023u) & ~1023u;

    const int tid = threadIdx.x;

    // Grouped raster: 8 M tiles share a band of N tiles for L2 reuse.
    const int tilesN = gridDim.x, tilesM = gridDim.y;
    const int lin = blockIdx.y * tilesN + blockIdx.x;
    constexpr int GROUP = 8;
    const int per_group = GROUP * tilesN;
    const int g = lin / per_group;
    const int first_m = g * GROUP;
    const int gsz = min(tilesM - first_m, GROUP);
    const int in_g = lin - g * per_group;
    const int tm = first_m + in_g % gsz;
    const int tn = in_g / gsz;
    const int m0 = tm * BM, n0 = tn * BN;

    // Reduction walk.
    const bool dense = (count == nullptr);
    const int rb = (count != nullptr || bits != nullptr) ? m0 / rblk : 0;
    int cnt = 0;
    const int* idx = nullptr;
    int nsteps;
    if (dense) {
        nsteps = (K + BK - 1) / BK;
    } else {
        cnt = count[rb];
        idx = index + (long long)rb * index_stride;
        nsteps = (int)(((long long)cnt * kblk + BK - 1) / BK);
    }

    // Output mask: skip the GEMM when every covered column block is dropped.
    const unsigned long long* brow = nullptr;
    if (bits != nullptr) {
        brow = bits + (long long)rb * bits_stride;
        const int c_lo = n0 / cblk;
        const int c_hi = (min(n0 + BN, N) - 1) / cblk;
        bool any = false;
        for (int c = c_lo; c <= c_hi && !any; ++c) any = (brow[c >> 6] >> (c & 63)) & 1ull;
        if (!any) nsteps = 0;
    }

    const unsigned short* Ag = reinterpret_cast<const unsigned short*>(A);
    const unsigned short* Bg = reinterpret_cast<const unsigned short*>(B);

    auto load_stage = [&](int slot, int step) {
        const unsigned sa = sbase + (unsigned)(slot * cfg::STAGE_BYTES);
        const unsigned sb = sa + (unsigned)cfg::A_BYTES;
        if constexpr (A_KMAJ) bsmm90_load_kmaj<BM, THREADS, BK>(sa, Ag, lda, m0, M, step, K, dense, cnt, idx, kblk, tid);
        else                  bsmm90_load_mnmaj<BM, THREADS, BK>(sa, Ag, lda, m0, M, step, K, dense, cnt, idx, kblk, tid);
        if constexpr (B_KMAJ) bsmm90_load_kmaj<BN, THREADS, BK>(sb, Bg, ldb, n0, N, step, K, dense, cnt, idx, kblk, tid);
        else                  bsmm90_load_mnmaj<BN, THREADS, BK>(sb, Bg, ldb, n0, N, step, K, dense, cnt, idx, kblk, tid);
    };

    float acc[NACC];
#pragma unroll
    for (int i = 0; i < NACC; ++i) acc[i] = 0.f;

    const int wg = tid >> 7;
    // Descriptor constants (bytes).
    // this warpgroup's 64 rows of A: 64 K-major rows, or one 64-wide MN atom
    const unsigned a_wg_off = (unsigned)wg * (A_KMAJ ? 64 * BK * 2 : BK * 128);

#pragma unroll 1
    for (int s = 0; s < STAGES - 2; ++s) {
        if (s < nsteps) load_stage(s, s);
        bsmm90_cp_commit();
    }

#pragma unroll 1
    for (int kt = 0; kt < nsteps; ++kt) {
        bsmm90_cp_wait<STAGES - 3>();
        bsmm90_fence_proxy();
        __syncthreads();
        const int slot = kt % STAGES;
        const unsigned sa = sbase + (unsigned)(slot * cfg::STAGE_BYTES) + a_wg_off;
        const unsigned sb = sbase + (unsigned)(slot * cfg::STAGE_BYTES) + (unsigned)cfg::A_BYTES;
        bsmm90_mma_stage<BF16, A_KMAJ, B_KMAJ, BN, BK>(acc, sa, sb);
        const int ls = kt + STAGES - 2;
        if (ls < nsteps) load_stage(ls % STAGES, ls);
        bsmm90_cp_commit();
    }
    bsmm90_wg_wait<0>();
#pragma unroll
    for (int i = 0; i < NACC; ++i) bsmm90_reg_fence(acc[i]);
    bsmm90_cp_wait<0>();

    // Epilogue: accumulator fragment of m64nNk16: thread (warp w, lane l) of a warpgroup holds
    // rows 16w + l/4 (+8) and columns 8j + 2(l%4) (+1), acc[4j + {0,1,2,3}].
    const int wtid = tid & 127;
    const int row_a = m0 + wg * 64 + (wtid >> 5) * 16 + ((wtid & 31) >> 2);
    const int col_a = n0 + 2 * (wtid & 3);
    bsmm90_epilogue<T, ACT, BN>(acc, C, bias, M, N, ldc, alpha, brow, cblk, row_a, col_a);
#else
    // Built for a target without wgmma (e.g. sm_80 CI builds): never launched there.
    __trap();
#endif
}


#ifdef CUDROP_INSTANTIATE
#define BSMM90_INST(T, AK, BK_, ACT, BM, BN, ST)                                                  \
    template __global__ void bsmm_sm90<T, AK, BK_, ACT, BM, BN, ST>(const T*, const T*, T*,       \
        const T*, int, int, int, long long, long long, long long, float, const int*, const int*, \
        int, int, int, const unsigned long long*, int, int);
#define BSMM90_INST_T(T)                                                                          \
    BSMM90_INST(T, true, false, 0, 128, 256, 4) BSMM90_INST(T, true, true, 0, 128, 256, 4)       \
    BSMM90_INST(T, false, false, 0, 128, 256, 4) BSMM90_INST(T, true, false, 1, 128, 128, 6)
BSMM90_INST_T(cd_f16)
BSMM90_INST_T(cd_bf16)
#endif
