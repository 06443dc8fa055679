// Accumulator type per storage type: double accumulates in double, everything else (float and
// the 16-bit storage types) in float; cd_load / cd_store convert to and from it.
#pragma once
#include "dtypes.cuh"

template <typename T> struct cd_acc { typedef float type; };
template <> struct cd_acc<double> { typedef double type; };

__device__ __forceinline__ double cd_load(double x) { return x; }
template <typename T> __device__ __forceinline__ float cd_load(T x) { return cd_to_float(x); }

template <typename T> __device__ __forceinline__ T cd_store(typename cd_acc<T>::type v) {
    return cd_from_float<T>(v);
}
template <> __device__ __forceinline__ double cd_store<double>(double v) { return v; }

// Math on the accumulator type, one overload per precision (NVRTC has no <cmath> macros such as
// INFINITY, and spelling the float functions out keeps float math in float).
__device__ __forceinline__ float cd_exp(float v) { return expf(v); }
__device__ __forceinline__ double cd_exp(double v) { return exp(v); }
__device__ __forceinline__ float cd_tanh(float v) { return tanhf(v); }
__device__ __forceinline__ double cd_tanh(double v) { return tanh(v); }
// A product the compiler may not fuse into a following add (the same rounded value wherever it
// is recomputed).
__device__ __forceinline__ float cd_mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double cd_mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float cd_sqrt(float v) { return sqrtf(v); }
__device__ __forceinline__ double cd_sqrt(double v) { return sqrt(v); }
__device__ __forceinline__ float cd_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double cd_max(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float cd_neg_inf(float) { return __int_as_float(0xff800000); }
__device__ __forceinline__ double cd_neg_inf(double) {
    return __longlong_as_double(0xfff0000000000000ULL);
}

// Sum (max) of v over the warp, returned to every lane. The xor butterfly combines the same two
// values at each step on both lanes of a pair, so every lane holds the identical result, in a
// fixed order.
template <typename A>
__device__ __forceinline__ A cd_warp_sum(A v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <typename A>
__device__ __forceinline__ A cd_warp_max(A v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = cd_max(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// out[i] = f(x[i]) (TWO false) or f(x[i], y[i]) over n elements, computed in cd_acc<T>: each
// thread moves 16 bytes at a time (8 elements of a 16-bit type), then a scalar tail; any 1-D
// grid. Every array must be 16-byte aligned (the host copies a view that is not). Per-element
// 2-byte accesses ran GPT's bf16 residual adds (CuPy's add, 8M elements) at 41 µs, 3.4x
// PyTorch's vectorised 12 µs, and tanh GELU at twice PyTorch's time (H200, profile_step.py).
template <typename T> using cd_v16 = cd_vec<T, 16 / sizeof(T)>;

template <bool TWO, typename T, typename F>
__device__ __forceinline__ void cd_map(const T* __restrict__ x, const T* __restrict__ y,
                                       T* __restrict__ out, long long n, F f) {
    typedef typename cd_acc<T>::type A;
    constexpr int V = 16 / sizeof(T);
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (long long i = first; i < n / V; i += stride) {
        const cd_v16<T> a = reinterpret_cast<const cd_v16<T>*>(x)[i];
        const cd_v16<T> b = TWO ? reinterpret_cast<const cd_v16<T>*>(y)[i] : a;
        cd_v16<T> z;
#pragma unroll
        for (int k = 0; k < V; ++k) z.v[k] = cd_store<T>(f((A)cd_load(a.v[k]), (A)cd_load(b.v[k])));
        reinterpret_cast<cd_v16<T>*>(out)[i] = z;
    }
    for (long long i = n / V * V + first; i < n; i += stride)
        out[i] = cd_store<T>(f((A)cd_load(x[i]), (A)cd_load(TWO ? y[i] : x[i])));
}

// Calls row(r, lane) for each row r of `rows` that this thread's warp owns: a warp per row, a
// grid-stride loop over the rows (lastaxis.cu's kernels; any grid of whole warps).
template <typename F>
__device__ __forceinline__ void cd_warp_rows(long long rows, F row) {
    const int lane = threadIdx.x & 31;
    const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
    for (long long r = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5; r < rows;
         r += warps)
        row(r, lane);
}
