// Warp-level tensor-core helpers for sm_80 and newer, shared by the mma.sync kernels
// (bsmm_mma.cu, attention.cu): shared-memory addresses, cp.async copies, ldmatrix, mma.sync on
// 16-bit and TF32 operands.
#pragma once
#include "dtypes.cuh"

__device__ __forceinline__ unsigned cd_smem_addr(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

__device__ __forceinline__ void cd_cp_async16(unsigned dst, const void* src, bool valid) {
    // src-size 0 zero-fills: edges and block tails read as zeros and touch no memory.
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cd_cp_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cd_cp_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

template <bool TRANS> __device__ __forceinline__ void cd_ldsm_x4(unsigned* r, unsigned addr) {
    if (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// d += a b for one warp-level tile: m16n8k16 for the 16-bit types, m16n8k8 for TF32.
#define CD_MMA(SHAPE_TYPES)                                                                    \
    asm volatile("mma.sync.aligned." SHAPE_TYPES " {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "     \
                 "{%0,%1,%2,%3};"                                                             \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                             \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))
template <typename T>
__device__ __forceinline__ void cd_mma(float* d, const unsigned* a, const unsigned* b) {
    if constexpr (sizeof(T) == 4) CD_MMA("m16n8k8.row.col.f32.tf32.tf32.f32");
    else if constexpr (cd_is_bf16<T>::value) CD_MMA("m16n8k16.row.col.f32.bf16.bf16.f32");
    else CD_MMA("m16n8k16.row.col.f32.f16.f16.f32");
}

// Fragments are 32-bit registers: two 16-bit elements, or one float rounded to TF32 (the
// tensor cores would truncate; rounding matches cuBLAS's TF32).
template <typename T> __device__ __forceinline__ unsigned cd_frag(unsigned r) { return r; }
template <> __device__ __forceinline__ unsigned cd_frag<float>(unsigned r) {
    unsigned t;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(t) : "f"(__uint_as_float(r)));
    return t;
}

