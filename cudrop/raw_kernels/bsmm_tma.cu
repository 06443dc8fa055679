// bsmm_tma: Hopper (sm_90a) block-sparse GEMM fed by TMA (cp.async.bulk.tensor) + wgmma.
//
//   C[m, n] = act(alpha * sum_k A(m, k) B(k, n) + bias[n])      fp16 / bf16 in, fp32 accumulate
//
// Contract: identical to bsmm_sm90 (see bsmm.cuh / bsmm_sm90.cu), plus two CUtensorMap arguments
// (built on the host by cudrop/functional/tma.py) describing A and B:
//   * A K-major (A[m*lda+k]): dims {K, M}, row stride lda*2 bytes, box {64, BM}
//     A M-major (A[k*lda+m]): dims {M, K}, row stride lda*2 bytes, box {64, 64}
//   * B K-major (B[n*ldb+k]): dims {K, N}, row stride ldb*2 bytes, box {64, BN}
//     B N-major (B[k*ldb+n]): dims {N, K}, row stride ldb*2 bytes, box {64, 64}
//   all with 128-byte swizzle, zero out-of-bounds fill, element type f16 / bf16.
//
// Extra requirements of this kernel (checked by tma.py's `tma_eligible`; otherwise use bsmm_sm90):
//   * kblk % 64 == 0 when count/index are given (a 64-wide K box never crosses a dropped block)
//   * rblk % BM == 0 when count or bits are given
//   * A, B 16-byte aligned, lda and ldb multiples of 8 elements (TMA strides: multiples of 16 B)
//
// Template parameters: T (cd_f16 | cd_bf16), A_KMAJ, B_KMAJ, ACT (0 none, 1 relu, 2 gelu),
//   BM (64 or 128: BM/64 consumer warpgroups, each owning 64 rows), BN (128 or 256),
//   STAGES (>= 2 ring slots of BM x 64 + BN x 64 elements).
// Launch:
//   block = (BM/64 + 1) * 128 threads  (warpgroup 0 = producer, then the consumers)
//   grid  = (ceil(N/BN), ceil(M/BM), 1)   (remapped inside into groups of 8 M tiles)
//   dynamic smem = STAGES*(BM+BN)*64*2 + 2048 bytes (128x256 s4: 198656) -> set
//   max_dynamic_shared_size_bytes.
//
// Design: one elected producer thread walks the row block's kept-K list (or the dense [0, K)) in
// 64-wide steps and issues one TMA box per operand (two/four 64x64 boxes for MN-major operands)
// into a STAGES-deep ring; each slot has a "full" mbarrier (1 arrival + expect_tx bytes) and an
// "empty" mbarrier (one arrival per consumer warp). TMA writes the same 128-byte-swizzle layouts
// that bsmm_sm90's cp.async path builds, so the wgmma descriptors are the same. The consumers
// keep one wgmma batch in flight and release slot kt-1 after wgmma.wait_group 1.
// setmaxnreg moves registers from the producer (40) to the consumers (232) when BM == 128.

#include "sm90.cuh"

#ifndef BSMM_TMA_GROUP
#define BSMM_TMA_GROUP 8     // M tiles per raster group
#endif
#define BSMM_TMA_SCHED_CAP 64   // tiles a CTA's live-first schedule holds (of each kind)
#define BSMM_TMA_MAX_WARPS 12   // (BM / 64 + 1) * 4 at BM = 128

// 128-byte opaque CUtensorMap, passed by value as a __grid_constant__ parameter.
struct alignas(64) cd_tmap { unsigned long long v[16]; };

template <int BM, int BN, int STAGES>
struct bsmm_tma_cfg {
    static constexpr int BK = 64;
    static constexpr int CONSUMERS = BM / 64;
    static constexpr int THREADS = (CONSUMERS + 1) * 128;
    static constexpr int A_BYTES = BM * BK * 2;
    static constexpr int B_BYTES = BN * BK * 2;
    static constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
    static constexpr int SMEM_BYTES = STAGES * STAGE_BYTES + 2048;
};

#if BSMM90_ENABLED
__device__ __forceinline__ void bsmm90_mbar_init(unsigned a, unsigned n) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(a), "r"(n) : "memory");
}
__device__ __forceinline__ void bsmm90_mbar_arrive(unsigned a) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" :: "r"(a) : "memory");
}
__device__ __forceinline__ void bsmm90_mbar_wait(unsigned a, unsigned parity) {
    unsigned ok = 0;
    do {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(ok) : "r"(a), "r"(parity) : "memory");
    } while (!ok);
}
__device__ __forceinline__ void bsmm_tma_expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bsmm_tma_load2d(unsigned dst, const void* tmap, unsigned bar, int c0, int c1) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n"
        :: "r"(dst), "l"(reinterpret_cast<unsigned long long>(tmap)), "r"(bar), "r"(c0), "r"(c1) : "memory");
}
__device__ __forceinline__ void bsmm_tma_prefetch_map(const void* tmap) {
    asm volatile("prefetch.tensormap [%0];\n" :: "l"(reinterpret_cast<unsigned long long>(tmap)) : "memory");
}

template <typename T, bool A_KMAJ, bool B_KMAJ, int ACT, int BM, int BN, int STAGES>
__device__ __forceinline__ void bsmm_tma_body(
        T* __restrict__ C, const T* __restrict__ bias, int M, int N, int K, long long ldc, float alpha,
        const int* __restrict__ count, const int* __restrict__ index, int index_stride, int rblk, int kblk,
        const unsigned long long* __restrict__ bits, int bits_stride, int cblk,
        const void* tmA, const void* tmB) {
    using cfg = bsmm_tma_cfg<BM, BN, STAGES>;
    constexpr int BK = 64;
    constexpr bool BF16 = cd_is_bf16<T>::value;
    constexpr int NACC = BN / 2;
    constexpr int CONS = cfg::CONSUMERS;
    static_assert(cfg::THREADS / 32 <= BSMM_TMA_MAX_WARPS, "sched_warp holds a count per warp");

    extern __shared__ unsigned char bsmm_tma_smem_raw[];
    const unsigned sraw = bsmm90_smem_u32(bsmm_tma_smem_raw);
    const unsigned sbase = (sraw + 1023u) & ~1023u;
    const unsigned bar = sbase + (unsigned)(STAGES * cfg::STAGE_BYTES);   // full[s]: bar+8s, empty[s]: bar+8(S+s)
    const int tid = threadIdx.x;

    // Tiles: ceil(M/BM) x ceil(N/BN), walked in a grouped raster (8 M tiles share a band of N
    // tiles for L2 reuse). Any grid works: CTA c takes linear tiles c, c + #CTAs, ... (grid =
    // all tiles: one tile each; grid = #SMs: persistent, the producer prefetches the next tile
    // while the consumers run the epilogue), or under an output mask the schedule below.
    const int tilesN = (N + BN - 1) / BN, tilesM = (M + BM - 1) / BM;
    const int total = tilesN * tilesM;
    const int cta = blockIdx.y * gridDim.x + blockIdx.x, ncta = gridDim.x * gridDim.y;
    const bool dense = (count == nullptr);
    struct Tile { int m0, n0, nsteps, cnt; const int* idx; const unsigned long long* brow; };
    auto tile_at = [&](int lin) {
        Tile t;
        constexpr int GROUP = BSMM_TMA_GROUP;
        const int per_group = GROUP * tilesN;
        const int g = lin / per_group;
        const int first_m = g * GROUP;
        const int gsz = min(tilesM - first_m, GROUP);
        const int in_g = lin - g * per_group;
        t.m0 = (first_m + in_g % gsz) * BM;
        t.n0 = (in_g / gsz) * BN;
        const int rb = (count != nullptr || bits != nullptr) ? t.m0 / rblk : 0;
        t.cnt = 0; t.idx = nullptr; t.brow = nullptr;
        if (dense) t.nsteps = (K + BK - 1) / BK;
        else {
            t.cnt = count[rb];
            t.idx = index + (long long)rb * index_stride;
            t.nsteps = t.cnt * (kblk / BK);   // kblk % 64 == 0; a box past K is zero-filled by TMA
        }
        if (bits != nullptr) {
            t.brow = bits + (long long)rb * bits_stride;
            const int c_lo = t.n0 / cblk, c_hi = (min(t.n0 + BN, N) - 1) / cblk;
            bool any = false;
            for (int c = c_lo; c <= c_hi && !any; ++c) any = (t.brow[c >> 6] >> (c & 63)) & 1ull;
            if (!any) t.nsteps = 0;
        }
        return t;
    };

    // Under an output mask (sdd) with more tiles than CTAs, CTA c takes the live tiles of rank
    // c, c + #CTAs, ... first, then the dead ones (ranked alike; each writes zeros and costs no
    // main loop): round-robin over raster order leaves a CTA two live tiles where others have
    // none (H200, 1024 x 4096 x 4096 bf16 under 128 x 128 blocks, half kept: 58 µs, no faster
    // than all kept; 48 µs with this schedule, where the reads from L2 bound the rest). All
    // threads rank one chunk of tiles at a time (warp ballots, one block scan: a serial scan by
    // one warp cost 8-15 µs a product); a CTA's list lives in shared memory, so the schedule
    // runs where its share of tiles fits (``BSMM_TMA_SCHED_CAP``), round-robin elsewhere.
    __shared__ int sched_live[BSMM_TMA_SCHED_CAP], sched_dead[BSMM_TMA_SCHED_CAP];
    __shared__ int sched_warp[2][BSMM_TMA_MAX_WARPS];
    const bool sched = bits != nullptr && total > ncta && (total + ncta - 1) / ncta <= BSMM_TMA_SCHED_CAP;
    int n_live = 0, n_mine = total > cta ? (total - 1 - cta) / ncta + 1 : 0;
    if (sched) {
        const int warp = tid >> 5, nwarps = blockDim.x >> 5;
        const unsigned below = (1u << (tid & 31)) - 1u;
        int live_base = 0, dead_base = 0;
#pragma unroll 1
        for (int base = 0; base < total; base += blockDim.x) {
            const int lin = base + tid;
            const bool in = lin < total;
            const bool live = in && tile_at(lin).nsteps > 0;
            const unsigned bl = __ballot_sync(~0u, live), bd = __ballot_sync(~0u, in && !live);
            if ((tid & 31) == 0) { sched_warp[0][warp] = __popc(bl); sched_warp[1][warp] = __popc(bd); }
            __syncthreads();
            int rl = live_base + __popc(bl & below), rd = dead_base + __popc(bd & below);
            for (int w = 0; w < nwarps; ++w) {
                if (w < warp) { rl += sched_warp[0][w]; rd += sched_warp[1][w]; }
                live_base += sched_warp[0][w];
                dead_base += sched_warp[1][w];
            }
            if (live && rl % ncta == cta) sched_live[rl / ncta] = lin;
            if (in && !live && rd % ncta == cta) sched_dead[rd / ncta] = lin;
            __syncthreads();   // sched_warp is rewritten by the next chunk
        }
        n_live = live_base > cta ? (live_base - 1 - cta) / ncta + 1 : 0;
        n_mine = n_live + (dead_base > cta ? (dead_base - 1 - cta) / ncta + 1 : 0);
    }
    // the linear index of this CTA's i-th tile
    auto tile_of = [&](int i) {
        return !sched ? cta + i * ncta : i < n_live ? sched_live[i] : sched_dead[i - n_live];
    };

    if (tid == 0) {
        for (int s = 0; s < STAGES; ++s) {
            bsmm90_mbar_init(bar + 8 * s, 1);
            bsmm90_mbar_init(bar + 8 * (STAGES + s), CONS * 4);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        bsmm_tma_prefetch_map(tmA);
        bsmm_tma_prefetch_map(tmB);
    }
    __syncthreads();

    if (tid < 128) {
        // ---------------- producer warpgroup: one elected thread issues every TMA ----------------
        if constexpr (CONS == 2) asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
        if (tid == 0) {
            const int kpb = kblk / BK;          // boxes per kept block (sparse mode)
            int slot = 0, phase = 0, issued = 0;
#pragma unroll 1
            for (int i = 0; i < n_mine; ++i) {
                const Tile t = tile_at(tile_of(i));
                int b = 0, sub = 0;
                int j_cur = (!dense && t.cnt > 0) ? __ldg(t.idx) : 0;
                int j_next = (!dense && t.cnt > 1) ? __ldg(t.idx + 1) : 0;
#pragma unroll 1
                for (int s = 0; s < t.nsteps; ++s) {
                    if (issued >= STAGES) bsmm90_mbar_wait(bar + 8 * (STAGES + slot), phase ^ 1);
                    const int k0 = dense ? s * BK : j_cur * kblk + sub * BK;
                    const unsigned fb = bar + 8 * slot;
                    const unsigned sa = sbase + (unsigned)(slot * cfg::STAGE_BYTES);
                    const unsigned sb = sa + (unsigned)cfg::A_BYTES;
                    bsmm_tma_expect_tx(fb, (unsigned)cfg::STAGE_BYTES);
                    if constexpr (A_KMAJ) bsmm_tma_load2d(sa, tmA, fb, k0, t.m0);
                    else {
#pragma unroll
                        for (int i = 0; i < BM / 64; ++i) bsmm_tma_load2d(sa + i * (BK * 128), tmA, fb, t.m0 + 64 * i, k0);
                    }
                    if constexpr (B_KMAJ) bsmm_tma_load2d(sb, tmB, fb, k0, t.n0);
                    else {
#pragma unroll
                        for (int i = 0; i < BN / 64; ++i) bsmm_tma_load2d(sb + i * (BK * 128), tmB, fb, t.n0 + 64 * i, k0);
                    }
                    if (!dense && ++sub == kpb) {
                        sub = 0; ++b;
                        j_cur = j_next;
                        j_next = (b + 1 < t.cnt) ? __ldg(t.idx + b + 1) : 0;
                    }
                    ++issued;
                    if (++slot == STAGES) { slot = 0; phase ^= 1; }
                }
            }
        }
        return;
    }

    // ---------------- consumer warpgroups ----------------
    if constexpr (CONS == 2) asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
    const int ctid = tid - 128;
    const int wg = ctid >> 7;
    const int lane = tid & 31;
    // this warpgroup's 64 rows of A: 64 K-major rows, or one 64-wide MN atom
    const unsigned a_wg_off = (unsigned)wg * (A_KMAJ ? 64 * BK * 2 : BK * 128);
    int slot = 0, phase = 0;
    float acc[NACC];
#pragma unroll 1
    for (int i = 0; i < n_mine; ++i) {
    const Tile t = tile_at(tile_of(i));
    const int m0 = t.m0, n0 = t.n0;
    const unsigned long long* brow = t.brow;
#pragma unroll
    for (int i = 0; i < NACC; ++i) acc[i] = 0.f;
    int prev_slot = 0;
#pragma unroll 1
    for (int kt = 0; kt < t.nsteps; ++kt) {
        bsmm90_mbar_wait(bar + 8 * slot, phase);
        const unsigned sa = sbase + (unsigned)(slot * cfg::STAGE_BYTES) + a_wg_off;
        const unsigned sb = sbase + (unsigned)(slot * cfg::STAGE_BYTES) + (unsigned)cfg::A_BYTES;
        bsmm90_mma_stage<BF16, A_KMAJ, B_KMAJ, BN, BK>(acc, sa, sb);
        if (kt >= 1) {
            __syncwarp();
            if (lane == 0) bsmm90_mbar_arrive(bar + 8 * (STAGES + prev_slot));
        }
        prev_slot = slot;
        if (++slot == STAGES) { slot = 0; phase ^= 1; }
    }
    bsmm90_wg_wait<0>();
#pragma unroll
    for (int i = 0; i < NACC; ++i) bsmm90_reg_fence(acc[i]);
    if (t.nsteps > 0) {       // release the tile's last slot (the producer may be on the next tile)
        __syncwarp();
        if (lane == 0) bsmm90_mbar_arrive(bar + 8 * (STAGES + prev_slot));
    }

    // Epilogue: m64nNk16 fragment: thread (warp w, lane l) of a warpgroup holds rows 16w + l/4 (+8),
    // columns 8j + 2(l%4) (+1) in acc[4j + {0,1,2,3}].
    const int wtid = ctid & 127;
    const int row_a = m0 + wg * 64 + (wtid >> 5) * 16 + ((wtid & 31) >> 2);
    const int col_a = n0 + 2 * (wtid & 3);
    bsmm90_epilogue<T, ACT, BN>(acc, C, bias, M, N, ldc, alpha, brow, cblk, row_a, col_a);
    }   // tile loop
}
#endif  // BSMM90_ENABLED

// Tensor maps by value (__grid_constant__): the normal entry point.
template <typename T, bool A_KMAJ, bool B_KMAJ, int ACT, int BM, int BN, int STAGES>
__global__ void __launch_bounds__((BM / 64 + 1) * 128, 1)
bsmm_tma(const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ C, const T* __restrict__ bias,
         int M, int N, int K, long long lda, long long ldb, long long ldc, float alpha,
         const int* __restrict__ count, const int* __restrict__ index, int index_stride, int rblk, int kblk,
         const unsigned long long* __restrict__ bits, int bits_stride, int cblk,
         const __grid_constant__ cd_tmap tmA, const __grid_constant__ cd_tmap tmB) {
    static_assert(BM == 64 || BM == 128, "BM must be 64 or 128");
    static_assert(BN == 128 || BN == 256, "BN must be 128 or 256");
    static_assert(STAGES >= 2, "STAGES >= 2");
#if BSMM90_ENABLED
    bsmm_tma_body<T, A_KMAJ, B_KMAJ, ACT, BM, BN, STAGES>(C, bias, M, N, K, ldc, alpha, count, index,
        index_stride, rblk, kblk, bits, bits_stride, cblk, &tmA, &tmB);
#else
    __trap();   // built for a target without TMA/wgmma (sm_80 CI builds): never launched there
#endif
}

#ifdef CUDROP_INSTANTIATE
#define BSMM_TMA_INST(T, AK, BKM, ACT, BM, BN, ST)                                                   \
    template __global__ void bsmm_tma<T, AK, BKM, ACT, BM, BN, ST>(const T*, const T*, T*, const T*,    \
        int, int, int, long long, long long, long long, float, const int*, const int*, int, int, int,   \
        const unsigned long long*, int, int, const __grid_constant__ cd_tmap, const __grid_constant__ cd_tmap);
BSMM_TMA_INST(cd_f16, true, false, 0, 128, 256, 4)
BSMM_TMA_INST(cd_f16, true, true, 0, 128, 256, 4)
BSMM_TMA_INST(cd_f16, false, false, 0, 128, 256, 4)
BSMM_TMA_INST(cd_f16, true, false, 1, 128, 256, 4)
BSMM_TMA_INST(cd_bf16, true, false, 0, 128, 256, 4)
BSMM_TMA_INST(cd_bf16, true, true, 0, 128, 256, 4)
BSMM_TMA_INST(cd_bf16, false, false, 0, 128, 256, 4)
BSMM_TMA_INST(cd_f16, true, false, 0, 128, 128, 6)
BSMM_TMA_INST(cd_bf16, true, true, 0, 128, 128, 6)
BSMM_TMA_INST(cd_f16, true, false, 0, 64, 128, 6)
#endif
