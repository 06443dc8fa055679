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
