// Sums over the leading axes of a C-contiguous array viewed as (R, C): out[c] = sum_r g[r, c]
// ("column sums"), or sum_r g[r, c] * x[r, c], optionally together with the plain sum from the
// same pass (layer norm's gamma and beta gradients from one read of g). CuPy's axis-0 reduction
// was slow on these shapes: a GPT step profiled on an H200 spent 3.6 of 18.5 ms in `cupy_sum`,
// mostly layer norm's gamma/beta gradients and broadcast-add gradients of (8192, 1024) bf16.
//
// Layout: block (BX, BY), BX * BY = 256, BX a power of two up to 64 (host: the smallest power of
// two >= C, at most 64), so a warp reads consecutive columns of one row (BX >= 32) or whole
// consecutive rows of a narrow array (BX < 32): every load is coalesced. grid.x walks column
// tiles of BX, grid.y splits the rows into S chunks of `chunk` rows (host: enough blocks to fill
// the GPU when the column tiles alone do not). Thread (tx, ty) sums rows ty, ty + BY, ... of its
// chunk, CD_COLSUM_UNROLL loads in flight before their adds; the block then adds over ty in a
// fixed tree order. With S = 1 the block writes the result; with S > 1 it writes a partial to
// part (nout, S, C) and colsum_merge adds the S partials of a column in a fixed order: the
// results are deterministic, without atomics.
//
// x has g's accumulation type cd_acc<T> (float for the 16-bit types and float, double for
// double), the type in which layer norm keeps xhat (lastaxis.cu), so g is never widened into a
// temporary. Results are written as T, or as cd_acc<T> with out_acc = 1 (e.g. float32 gamma of a
// bf16 activation); outputs are untyped pointers for that reason.
#include "accum.cuh"

#define CD_COLSUM_THREADS 256
#define CD_COLSUM_UNROLL 8

// Sums s_gx += g * x (X) or g, and s_g += g (X only), over rows r0 + threadIdx.y, +blockDim.y,
// ... < r1 of column c: CD_COLSUM_UNROLL predicated loads issued before their adds.
template <bool X, typename In, typename A>
__device__ __forceinline__ void cd_colsum_walk(const In* __restrict__ g, const A* __restrict__ x,
                                               long long r0, long long r1, long long C,
                                               long long c, A& s_gx, A& s_g) {
    const long long step = blockDim.y;
    for (long long r = r0 + threadIdx.y; r < r1; r += step * CD_COLSUM_UNROLL) {
        A gv[CD_COLSUM_UNROLL], xv[CD_COLSUM_UNROLL];
#pragma unroll
        for (int k = 0; k < CD_COLSUM_UNROLL; ++k) {
            const long long rk = r + k * step;
            gv[k] = rk < r1 ? (A)cd_load(g[rk * C + c]) : A(0);
            if (X) xv[k] = rk < r1 ? x[rk * C + c] : A(0);
        }
#pragma unroll
        for (int k = 0; k < CD_COLSUM_UNROLL; ++k) {
            if (X) {
                s_gx += gv[k] * xv[k];
                s_g += gv[k];
            } else {
                s_gx += gv[k];
            }
        }
    }
}

// Sum of v over threadIdx.y (blockDim.y a power of two), in a fixed tree order; the result is
// valid in the threads with threadIdx.y == 0. sh: one value per thread of the block.
template <typename A>
__device__ __forceinline__ A cd_sum_over_y(A v, A* sh) {
    const int i = threadIdx.y * blockDim.x + threadIdx.x;
    sh[i] = v;
    __syncthreads();
    for (int h = blockDim.y >> 1; h > 0; h >>= 1) {
        if ((int)threadIdx.y < h) sh[i] += sh[i + h * blockDim.x];
        __syncthreads();
    }
    return sh[threadIdx.x];
}

template <typename T>
__device__ __forceinline__ void cd_colsum_put(void* out, long long c,
                                              typename cd_acc<T>::type v, int out_acc) {
    if (out_acc) static_cast<typename cd_acc<T>::type*>(out)[c] = v;
    else static_cast<T*>(out)[c] = cd_store<T>(v);
}

// g, x: (R, C); has_x 0: x is not read (any pointer). out0 receives sum g * x (has_x) or sum g;
// out1 the sum of g when has_x and two (else not written). part: (1 + two, S, C) partials when
// S = gridDim.y > 1 (else not touched); chunk: rows per grid.y block, S * chunk >= R.
template <typename T>
__global__ void __launch_bounds__(CD_COLSUM_THREADS)
colsum(const T* __restrict__ g, const typename cd_acc<T>::type* __restrict__ x,
       void* __restrict__ out0, void* __restrict__ out1,
       typename cd_acc<T>::type* __restrict__ part, long long R, long long C, long long chunk,
       int has_x, int two, int out_acc) {
    typedef typename cd_acc<T>::type A;
    __shared__ A sh[2][CD_COLSUM_THREADS];
    const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long r0 = (long long)blockIdx.y * chunk;
    const long long r1 = r0 + chunk < R ? r0 + chunk : R;
    A s_gx = 0, s_g = 0;
    if (c < C) {
        if (has_x) cd_colsum_walk<true>(g, x, r0, r1, C, c, s_gx, s_g);
        else cd_colsum_walk<false>(g, x, r0, r1, C, c, s_gx, s_g);
    }
    two = has_x && two;
    s_gx = cd_sum_over_y(s_gx, sh[0]);
    if (two) s_g = cd_sum_over_y(s_g, sh[1]);  // uniform over the block
    if (threadIdx.y != 0 || c >= C) return;
    const long long S = gridDim.y;
    if (S == 1) {
        cd_colsum_put<T>(out0, c, s_gx, out_acc);
        if (two) cd_colsum_put<T>(out1, c, s_g, out_acc);
    } else {
        part[blockIdx.y * C + c] = s_gx;
        if (two) part[(S + blockIdx.y) * C + c] = s_g;
    }
}

// The S partials of colsum added per column, rows s = 0 .. S-1 of part[o] (S, C) walked as
// colsum walks g (fixed order): grid (column tiles, 1 + two), block as colsum's; writes out0
// (o = 0) and out1 (o = 1) as colsum does for S = 1.
template <typename T>
__global__ void __launch_bounds__(CD_COLSUM_THREADS)
colsum_merge(const typename cd_acc<T>::type* __restrict__ part, void* __restrict__ out0,
             void* __restrict__ out1, long long S, long long C, int out_acc) {
    typedef typename cd_acc<T>::type A;
    __shared__ A sh[CD_COLSUM_THREADS];
    const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const A* __restrict__ p = part + blockIdx.y * S * C;
    A s = 0, unused = 0;
    if (c < C) cd_colsum_walk<false>(p, p, 0, S, C, c, s, unused);
    s = cd_sum_over_y(s, sh);
    if (threadIdx.y == 0 && c < C) cd_colsum_put<T>(blockIdx.y ? out1 : out0, c, s, out_acc);
}

#ifdef CUDROP_INSTANTIATE
#define CD_INST(T) \
    template __global__ void colsum<T>(const T*, const cd_acc<T>::type*, void*, void*, \
        cd_acc<T>::type*, long long, long long, long long, int, int, int); \
    template __global__ void colsum_merge<T>(const cd_acc<T>::type*, void*, void*, long long, \
        long long, int);
CD_INST(float)
CD_INST(double)
CD_INST(cd_f16)
CD_INST(cd_bf16)
#endif
