// SliceOut with the slice decided on the device (a captured CUDA graph's step lives there):
// every kernel derives the slice start from (seed, layer, step) itself, reading the step from
// step_ptr when it is not null, so a replayed graph gathers the slice of the step the host wrote
// last. The unit axis is the middle one of an (outer, n, inner) view of a C-contiguous array:
// columns of a 2-D array are (rows, n, 1), rows are (1, n, cols), a vector is (1, n, 1).
#include "philox.cuh"
#include "dtypes.cuh"
#include "slice.cuh"

// One Philox call per thread (the grid is capped on the host so each thread then walks several
// elements): cheaper than a separate launch writing the start to memory for the others to read,
// and it keeps each kernel self-contained inside a graph.
__device__ __forceinline__ long long cd_device_slice_start(
        unsigned int seed, unsigned int layer, unsigned int step, const unsigned int* step_ptr,
        long long n, long long keep, long long count, long long unit) {
    const unsigned int step_now = step_ptr ? *step_ptr : step;
    const unsigned int word = cd_mask_word(seed, layer, step_now, CD_TAG_SLICE, 0u, 0ull);
    return cd_slice_start_of(word, n, keep, count, unit);
}

// dst (outer, keep, inner) = the kept units of src (outer, n, inner), in slice order, times
// `scale` when `scaled` (scale is the dtype-rounded value: x * s in the dtype, as CuPy computes
// `x * dtype(s)`), else copied bit for bit.
template <typename T>
__global__ void slice_gather(const T* __restrict__ src, T* __restrict__ dst, long long outer,
                             long long n, long long inner, long long keep, unsigned int seed,
                             unsigned int layer, unsigned int step,
                             const unsigned int* __restrict__ step_ptr, long long count,
                             long long unit, double scale, int scaled) {
    const long long start = cd_device_slice_start(seed, layer, step, step_ptr, n, keep, count, unit);
    const long long total = outer * keep * inner;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        const long long i = t % inner, r = t / inner;
        const long long j = r % keep, o = r / keep;
        const T v = src[(o * n + cd_slice_unit(start, j, n)) * inner + i];
        dst[t] = scaled ? cd_scale_or_zero(v, scale, true) : v;
    }
}

// dst (outer, n, inner) = part (outer, keep, inner) written back at the kept units, exact
// zeros (+0) at the dropped ones: the full-size gradient of a parameter, every element written.
template <typename T>
__global__ void slice_scatter(const T* __restrict__ part, T* __restrict__ dst, long long outer,
                              long long n, long long inner, long long keep, unsigned int seed,
                              unsigned int layer, unsigned int step,
                              const unsigned int* __restrict__ step_ptr, long long count,
                              long long unit) {
    const long long start = cd_device_slice_start(seed, layer, step, step_ptr, n, keep, count, unit);
    const long long total = outer * n * inner;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        const long long i = t % inner, r = t / inner;
        const long long u = r % n, o = r / n;
        const long long pos = cd_slice_pos(start, u, n, keep);
        dst[t] = pos >= 0 ? part[(o * keep + pos) * inner + i] : T{};
    }
}

// The start at each of `m` steps (tests compare it with the host's slice_start). The template
// argument is unused: it lets the one templated loader (raw_kernels.launch) serve this too.
template <typename T>
__global__ void slice_starts(const unsigned int* __restrict__ steps, long long* __restrict__ out,
                             long long m, unsigned int seed, unsigned int layer, long long n,
                             long long keep, long long count, long long unit) {
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t < m) out[t] = cd_device_slice_start(seed, layer, 0u, steps + t, n, keep, count, unit);
}

#ifdef CUDROP_INSTANTIATE  // explicit instances for the nvcc compile check (NVRTC uses name_expressions)
#define CD_INST(T) \
    template __global__ void slice_gather<T>(const T*, T*, long long, long long, long long, \
        long long, unsigned int, unsigned int, unsigned int, const unsigned int*, long long, \
        long long, double, int); \
    template __global__ void slice_scatter<T>(const T*, T*, long long, long long, long long, \
        long long, unsigned int, unsigned int, unsigned int, const unsigned int*, long long, \
        long long); \
    template __global__ void slice_starts<T>(const unsigned int*, long long*, long long, \
        unsigned int, unsigned int, long long, long long, long long, long long);
CD_INST(float) CD_INST(double) CD_INST(cd_f16) CD_INST(cd_bf16)
#endif
