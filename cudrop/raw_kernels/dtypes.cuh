// 16-bit float types as plain storage, converted with PTX so no CUDA header is needed under
// NVRTC (the pip CUDA layout lacks some headers; DESIGN.md §4). Arithmetic happens in float.
#pragma once

struct cd_f16 { unsigned short v; };
struct cd_bf16 { unsigned short v; };

// V elements moved as one access (16 bytes when V = 16 / sizeof(T)); the array must be aligned
// to V * sizeof(T) (the host copies a view that is not: raw_kernels.aligned / vector_aligned).
template <typename T, int V> struct alignas(sizeof(T) * V) cd_vec { T v[V]; };
template <typename T> using cd_vec4 = cd_vec<T, 4>;

template <typename T> struct cd_is_bf16 { static constexpr bool value = false; };
template <> struct cd_is_bf16<cd_bf16> { static constexpr bool value = true; };

__device__ __forceinline__ float cd_to_float(cd_f16 x) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.v)); return f;
}
__device__ __forceinline__ float cd_to_float(cd_bf16 x) {
    return __uint_as_float(((unsigned int)x.v) << 16);
}
__device__ __forceinline__ float cd_to_float(float x) { return x; }

template <typename T> __device__ __forceinline__ T cd_from_float(float f);
template <> __device__ __forceinline__ float cd_from_float<float>(float f) { return f; }
template <> __device__ __forceinline__ cd_f16 cd_from_float<cd_f16>(float f) {
    cd_f16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.v) : "f"(f)); return h;
}
template <> __device__ __forceinline__ cd_bf16 cd_from_float<cd_bf16>(float f) {
    cd_bf16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.v) : "f"(f)); return h;
}

// x * s, or an exact zero: double stays double, the rest compute in float.
template <typename T> __device__ __forceinline__ T cd_scale_or_zero(T x, double s, bool keep) {
    return cd_from_float<T>(keep ? cd_to_float(x) * (float)s : 0.0f);
}
template <> __device__ __forceinline__ double cd_scale_or_zero<double>(double x, double s, bool keep) {
    return keep ? x * s : 0.0;
}
