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

// The copies walk the arrays in groups of `group` units (a divisor of the unit count, the kept
// count and the start, chosen on the host: the alignment of an aligned slice), so an
// (outer, n, inner) array is walked as (outer, n / group, inner * group) rows of contiguous
// elements, V at a time (one 16-byte access when every row and both arrays allow it), with
// 32-bit index arithmetic where the array is small enough. Element per thread with 64-bit
// division ran the bf16 SliceOut MLP's captured step (1024 x 4096, three layers) at 1.25 ms
// against plain dropout's 0.71 on the H200.
struct cd_slice_walk {
    long long outer, n, keep, inner, start;  // in groups: n, keep and start divided, inner times
};

__device__ __forceinline__ cd_slice_walk cd_slice_grouped(long long outer, long long n,
                                                          long long inner, long long keep,
                                                          long long start, long long group) {
    return {outer, n / group, keep / group, inner * group, start / group};
}

// dst (outer, keep, inner) = src's kept rows; part -> dst (outer, n, inner) with zero rows
// elsewhere when Scatter. Scaled values are x * s in float (double stays double).
template <typename T, int V, typename I, bool Scatter>
__device__ __forceinline__ void cd_slice_copy(const T* __restrict__ src, T* __restrict__ dst,
                                              const cd_slice_walk w, double scale, bool scaled) {
    const I per_row = (I)(w.inner / V);
    const I rows = (I)(w.outer * (Scatter ? w.n : w.keep));
    const I total = rows * per_row;
    for (I t = (I)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (I)gridDim.x * blockDim.x) {
        const I r = t / per_row, c = t - r * per_row;
        cd_vec<T, V> v;
        if (Scatter) {
            const I o = r / (I)w.n, u = r - o * (I)w.n;
            const long long pos = cd_slice_pos(w.start, (long long)u, w.n, w.keep);
            if (pos < 0) {
#pragma unroll
                for (int k = 0; k < V; ++k) v.v[k] = T{};
                reinterpret_cast<cd_vec<T, V>*>(dst)[t] = v;
                continue;
            }
            v = reinterpret_cast<const cd_vec<T, V>*>(src)[(I)((o * (I)w.keep + (I)pos) * per_row) + c];
        } else {
            const I o = r / (I)w.keep, j = r - o * (I)w.keep;
            const I u = (I)cd_slice_unit(w.start, (long long)j, w.n);
            v = reinterpret_cast<const cd_vec<T, V>*>(src)[(o * (I)w.n + u) * per_row + c];
        }
        if (scaled) {
#pragma unroll
            for (int k = 0; k < V; ++k) v.v[k] = cd_scale_or_zero(v.v[k], scale, true);
        }
        reinterpret_cast<cd_vec<T, V>*>(dst)[t] = v;
    }
}

// The 16-byte walk where the rows and both pointers allow it, else element by element; 32-bit
// indices where the full side of the copy (outer x n x inner: a gather's source, a scatter's
// destination) is below 2**31 elements (so no index, nor the grid stride added to one, wraps).
template <typename T, bool Scatter>
__device__ __forceinline__ void cd_slice_dispatch(const T* src, T* dst, const cd_slice_walk w,
                                                  double scale, bool scaled) {
    constexpr int V = 16 / sizeof(T);
    const bool vec = (w.inner % V) == 0 && ((size_t)src % 16 | (size_t)dst % 16) == 0;
    const long long elems = w.outer * w.n * w.inner;
    if (elems < (1ll << 31)) {
        if (vec) cd_slice_copy<T, V, unsigned int, Scatter>(src, dst, w, scale, scaled);
        else cd_slice_copy<T, 1, unsigned int, Scatter>(src, dst, w, scale, scaled);
    } else {
        if (vec) cd_slice_copy<T, V, unsigned long long, Scatter>(src, dst, w, scale, scaled);
        else cd_slice_copy<T, 1, unsigned long long, Scatter>(src, dst, w, scale, scaled);
    }
}

// dst (outer, keep, inner) = the kept units of src (outer, n, inner), in slice order, times
// `scale` when `scaled` (scale is the dtype-rounded value: x * s in the dtype, as CuPy computes
// `x * dtype(s)`), else copied bit for bit. `group`: see cd_slice_walk.
template <typename T>
__global__ void slice_gather(const T* __restrict__ src, T* __restrict__ dst, long long outer,
                             long long n, long long inner, long long keep, unsigned int seed,
                             unsigned int layer, unsigned int step,
                             const unsigned int* __restrict__ step_ptr, long long count,
                             long long unit, long long group, double scale, int scaled) {
    const long long start = cd_device_slice_start(seed, layer, step, step_ptr, n, keep, count, unit);
    cd_slice_dispatch<T, false>(src, dst, cd_slice_grouped(outer, n, inner, keep, start, group),
                                scale, scaled);
}

// dst (outer, n, inner) = part (outer, keep, inner) written back at the kept units (times
// `scale` when `scaled`, as slice_gather), exact zeros (+0) at the dropped ones: the full-size
// gradient of a parameter or an input, every element written.
template <typename T>
__global__ void slice_scatter(const T* __restrict__ part, T* __restrict__ dst, long long outer,
                              long long n, long long inner, long long keep, unsigned int seed,
                              unsigned int layer, unsigned int step,
                              const unsigned int* __restrict__ step_ptr, long long count,
                              long long unit, long long group, double scale, int scaled) {
    const long long start = cd_device_slice_start(seed, layer, step, step_ptr, n, keep, count, unit);
    cd_slice_dispatch<T, true>(part, dst, cd_slice_grouped(outer, n, inner, keep, start, group),
                               scale, scaled);
}

// One axis of a weight block sliced on both axes (sliceout.py's _BLOCK_AXIS, passed by value):
// the kept count, and the Philox key, step (value, or pointer when not null), valid-start count
// and unit from which the start is computed.
struct cd_block_axis {
    long long keep, count, unit;
    const unsigned int* step_ptr;
    unsigned int seed, layer, step;
};

// The kept block W[S_rows, S_cols] of a C-contiguous (rows, cols) array moved in one pass, both
// slices decided on the device (sliceout_linear_compact's weight and its gradient). One thread
// per CTA computes both starts into shared memory; the CTA's warps then walk whole rows, so a
// kept row is at most two contiguous runs of columns, V elements an access where the column
// count, the kept count and the start allow it (then no access straddles the wrap). The two 1-D
// passes before it moved the block twice: measured in the captured bf16 SliceOut MLP step (H200)
// at 57 us of gathers and 77 us of scatters, about 2 TB/s.
template <typename T, int V, bool Scatter>
__device__ __forceinline__ void cd_block_rows(const T* __restrict__ src, T* __restrict__ dst,
                                              long long rows, long long cols,
                                              long long row_keep, long long col_keep,
                                              long long r0, long long c0, double scale,
                                              bool scaled) {
    typedef cd_vec<T, V> Vec;
    const long long out_rows = Scatter ? rows : row_keep;
    const long long width = (Scatter ? cols : col_keep) / V;  // vectors a destination row
    const Vec* s = reinterpret_cast<const Vec*>(src);
    Vec* d = reinterpret_cast<Vec*>(dst);
    for (long long j = (long long)blockIdx.x * blockDim.y + threadIdx.y; j < out_rows;
         j += (long long)gridDim.x * blockDim.y) {
        // the source row: a kept row of src (gather), or the part's row of dst row j (scatter)
        const long long r = Scatter ? cd_slice_pos(r0, j, rows, row_keep)
                                    : cd_slice_unit(r0, j, rows);
        Vec* drow = d + j * width;
        const Vec* srow = s + (r < 0 ? 0 : r) * ((Scatter ? col_keep : cols) / V);
        for (long long c = threadIdx.x; c < width; c += blockDim.x) {
            Vec v;
            const long long col = Scatter ? cd_slice_pos(c0, c * V, cols, col_keep)
                                          : cd_slice_unit(c0, c * V, cols);
            if (r < 0 || col < 0) {
#pragma unroll
                for (int k = 0; k < V; ++k) v.v[k] = T{};
            } else {
                v = srow[col / V];
                if (scaled) {
#pragma unroll
                    for (int k = 0; k < V; ++k) v.v[k] = cd_scale_or_zero(v.v[k], scale, true);
                }
            }
            drow[c] = v;
        }
    }
}

template <typename T, bool Scatter>
__device__ __forceinline__ void cd_block_copy(const T* src, T* dst, long long rows, long long cols,
                                              const cd_block_axis& ra, const cd_block_axis& ca,
                                              double scale, bool scaled) {
    __shared__ long long starts[2];
    if (threadIdx.x == 0 && threadIdx.y == 0) {
        starts[0] = cd_device_slice_start(ra.seed, ra.layer, ra.step, ra.step_ptr, rows, ra.keep,
                                          ra.count, ra.unit);
        starts[1] = cd_device_slice_start(ca.seed, ca.layer, ca.step, ca.step_ptr, cols, ca.keep,
                                          ca.count, ca.unit);
    }
    __syncthreads();
    constexpr int V = 16 / sizeof(T);
    const bool vec = ((cols | ca.keep | starts[1]) % V) == 0 &&
                     ((size_t)src % 16 | (size_t)dst % 16) == 0;
    if (vec) cd_block_rows<T, V, Scatter>(src, dst, rows, cols, ra.keep, ca.keep, starts[0],
                                          starts[1], scale, scaled);
    else cd_block_rows<T, 1, Scatter>(src, dst, rows, cols, ra.keep, ca.keep, starts[0],
                                      starts[1], scale, scaled);
}

// dst (row keep, col keep) = the kept block of src (rows, cols), in slice order on both axes,
// times `scale` when `scaled` (as slice_gather).
template <typename T>
__global__ void slice_block_gather(const T* __restrict__ src, T* __restrict__ dst, long long rows,
                                   long long cols, cd_block_axis ra, cd_block_axis ca,
                                   double scale, int scaled) {
    cd_block_copy<T, false>(src, dst, rows, cols, ra, ca, scale, scaled);
}

// dst (rows, cols) = part (row keep, col keep) written back at the kept block (times `scale`
// when `scaled`), exact zeros (+0) elsewhere: every element written.
template <typename T>
__global__ void slice_block_scatter(const T* __restrict__ part, T* __restrict__ dst,
                                    long long rows, long long cols, cd_block_axis ra,
                                    cd_block_axis ca, double scale, int scaled) {
    cd_block_copy<T, true>(part, dst, rows, cols, ra, ca, scale, scaled);
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
        long long, long long, double, int); \
    template __global__ void slice_scatter<T>(const T*, T*, long long, long long, long long, \
        long long, unsigned int, unsigned int, unsigned int, const unsigned int*, long long, \
        long long, long long, double, int); \
    template __global__ void slice_block_gather<T>(const T*, T*, long long, long long, \
        cd_block_axis, cd_block_axis, double, int); \
    template __global__ void slice_block_scatter<T>(const T*, T*, long long, long long, \
        cd_block_axis, cd_block_axis, double, int); \
    template __global__ void slice_starts<T>(const unsigned int*, long long*, long long, \
        unsigned int, unsigned int, long long, long long, long long, long long);
CD_INST(float) CD_INST(double) CD_INST(cd_f16) CD_INST(cd_bf16)
#endif
