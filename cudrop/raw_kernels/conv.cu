// Convolution helpers around the cuBLAS GEMMs of cudrop/functional/conv.py. The column matrix is
// col[K = C*kh*kw][Q = N*Ho*Wo], row (c, i, j), column (n, oh, ow): forward is one GEMM
// W(O, K) @ col, and the weight gradient gy(O, Q) @ colᵀ reads it as stored.
#include "accum.cuh"

// One column entry per kernel offset (i, j) of channel c at column q, read from the input
// channel xc (zero outside it: no padded copy). K > 0 fixes kh = kw = K at compile time: the
// loops unroll and every load is issued before the first store (the loads' addresses are
// clamped to xc[0] where the offset falls outside, so none is conditional). With runtime
// bounds (K = 0) each store waited for its load: one load in flight per thread, latency-bound
// (ResNet-56 on an H200: 1.2 ms of a 14 ms step in im2col, ~60% of its bandwidth bound).
template <int K, typename T>
__device__ __forceinline__ void im2col_column(const T* __restrict__ xc, T* __restrict__ out,
                                              long long Q, int H, int W, int h0, int w0,
                                              int kh_, int kw_) {
    const int kh = K ? K : kh_, kw = K ? K : kw_;
#pragma unroll
    for (int i = 0; i < kh; ++i) {
        const int h = h0 + i;
        const bool hin = h >= 0 && h < H;
#pragma unroll
        for (int j = 0; j < kw; ++j) {
            const int w = w0 + j;
            const bool in = hin && w >= 0 && w < W;
            const T v = xc[in ? (long long)h * W + w : 0];
            out[(long long)(i * kw + j) * Q] = in ? v : T{};  // T{}: +0.0 for every type
        }
    }
}

// Thread (q, c): output position q = (n, oh, ow) and input channel c. It writes the kh*kw rows of
// channel c at column q. Neighbouring threads take neighbouring q, so every row write is
// coalesced. grid: (ceil(Q / blockDim.x), min(C, 65535)); channels beyond gridDim.y loop.
template <typename T>
__global__ void im2col(const T* __restrict__ x, T* __restrict__ col, int N, int C, int H, int W,
                       int kh, int kw, int sh, int sw, int ph, int pw, int Ho, int Wo) {
    const long long Q = (long long)N * Ho * Wo;
    const long long q = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (q >= Q) return;
    const int P = Ho * Wo;
    const int n = (int)(q / P);
    const int r = (int)(q - (long long)n * P);
    const int oh = r / Wo, ow = r - oh * Wo;
    const int h0 = oh * sh - ph, w0 = ow * sw - pw;
    for (int c = blockIdx.y; c < C; c += gridDim.y) {
        const T* xc = x + ((long long)n * C + c) * H * W;
        T* out = col + (long long)c * kh * kw * Q + q;
        if (kh == 3 && kw == 3)  // uniform branch: ResNets' 3x3 convolutions
            im2col_column<3>(xc, out, Q, H, W, h0, w0, kh, kw);
        else
            im2col_column<0>(xc, out, Q, H, W, h0, w0, kh, kw);
    }
}

// The sum of the column entries that input element (h, w) of one (n, c) row was copied to, in
// the order (i, j) ascending. K > 0 fixes kh = kw = K and S > 0 fixes sh = sw = S at compile
// time: unrolled, every load issued before the sum (addresses clamped to cc[0] where an offset
// saw no output), no integer division for S = 1. The runtime loop waited for each load in turn
// (latency-bound: 2.2 ms of a 14 ms ResNet-56 step on an H200, ~1/3 of its bandwidth bound).
// Same terms in the same order either way: the sums are bit-identical.
template <int K, int S, typename T>
__device__ __forceinline__ typename cd_acc<T>::type col2im_sum(
        const T* __restrict__ cc, long long Q, int h, int w, int kh_, int kw_, int sh_, int sw_,
        int ph, int pw, int Ho, int Wo) {
    typedef typename cd_acc<T>::type A;
    const int kh = K ? K : kh_, kw = K ? K : kw_, sh = S ? S : sh_, sw = S ? S : sw_;
    A acc = 0;
#pragma unroll
    for (int i = 0; i < kh; ++i) {
        const int hh = h + ph - i;  // = oh * sh for the output row that saw h at offset i
        const int oh = hh / sh;
        const bool hok = hh >= 0 && oh * sh == hh && oh < Ho;
#pragma unroll
        for (int j = 0; j < kw; ++j) {
            const int ww = w + pw - j;
            const int ow = ww / sw;
            const bool ok = hok && ww >= 0 && ow * sw == ww && ow < Wo;
            const T v = cc[ok ? (long long)(i * kw + j) * Q + (long long)oh * Wo + ow : 0];
            if (ok) acc += cd_load(v);
        }
    }
    return acc;
}

// The adjoint of im2col: each input element (n, c, h, w) sums the column entries it was copied
// to, in a fixed order (no atomics: deterministic). Accumulates in cd_acc<T>.
// grid: (ceil(H*W / blockDim.x), min(N*C, 65535)); rows (n, c) beyond gridDim.y loop.
template <typename T>
__global__ void col2im(const T* __restrict__ col, T* __restrict__ x, int N, int C, int H, int W,
                       int kh, int kw, int sh, int sw, int ph, int pw, int Ho, int Wo) {
    const int hw = blockIdx.x * blockDim.x + threadIdx.x;
    if (hw >= H * W) return;
    const int h = hw / W, w = hw - h * W;
    const long long Q = (long long)N * Ho * Wo;
    for (long long row = blockIdx.y; row < (long long)N * C; row += gridDim.y) {
        const int n = (int)(row / C), c = (int)(row - (long long)n * C);
        const T* cc = col + (long long)c * kh * kw * Q + (long long)n * Ho * Wo;
        typename cd_acc<T>::type acc;
        if (kh == 3 && kw == 3 && sh == 1 && sw == 1)  // uniform: ResNets' 3x3, stride 1
            acc = col2im_sum<3, 1>(cc, Q, h, w, kh, kw, sh, sw, ph, pw, Ho, Wo);
        else if (kh == 3 && kw == 3)
            acc = col2im_sum<3, 0>(cc, Q, h, w, kh, kw, sh, sw, ph, pw, Ho, Wo);
        else
            acc = col2im_sum<0, 0>(cc, Q, h, w, kh, kw, sh, sw, ph, pw, Ho, Wo);
        x[row * H * W + hw] = cd_store<T>(acc);
    }
}

// out[b][a][p] = in[a][b][p] (+ bias[a]): swaps the two leading axes of a (A, B, P) array. Both
// sides are contiguous along p, so no shared-memory tile is needed for coalescing.
// grid: (ceil(P / blockDim.x), min(A*B, 65535)) over output rows (b, a).
template <typename T>
__global__ void swap01(const T* __restrict__ in, T* __restrict__ out, const T* __restrict__ bias,
                       int A, int B, int P, int has_bias) {
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= P) return;
    for (long long row = blockIdx.y; row < (long long)A * B; row += gridDim.y) {
        const int b = (int)(row / A), a = (int)(row - (long long)b * A);
        const T v = in[((long long)a * B + b) * P + p];
        out[row * P + p] = has_bias ? cd_store<T>(cd_load(v) + cd_load(bias[a])) : v;
    }
}

#ifdef CUDROP_INSTANTIATE  // explicit instances for the nvcc compile check (NVRTC uses name_expressions)
#define CD_INST(T) \
    template __global__ void im2col<T>(const T*, T*, int, int, int, int, int, int, int, int, int, \
                                       int, int, int); \
    template __global__ void col2im<T>(const T*, T*, int, int, int, int, int, int, int, int, int, \
                                       int, int, int); \
    template __global__ void swap01<T>(const T*, T*, const T*, int, int, int, int);
CD_INST(float) CD_INST(double) CD_INST(cd_f16) CD_INST(cd_bf16)
#endif
