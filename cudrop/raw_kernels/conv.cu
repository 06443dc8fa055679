// Convolution helpers around the cuBLAS GEMMs of cudrop/functional/conv.py. The column matrix is
// col[K = C*kh*kw][Q = N*Ho*Wo], row (c, i, j), column (n, oh, ow): forward is one GEMM
// W(O, K) @ col, and the weight gradient gy(O, Q) @ colᵀ reads it as stored.
#include "accum.cuh"

// Thread (q, c): output position q = (n, oh, ow) and input channel c. It writes the kh*kw rows of
// channel c at column q, reading the input directly (zero outside it: no padded copy).
// Neighbouring threads take neighbouring q, so every row write is coalesced.
// grid: (ceil(Q / blockDim.x), min(C, 65535)); channels beyond gridDim.y loop.
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
        for (int i = 0; i < kh; ++i) {
            const int h = h0 + i;
            const bool hin = h >= 0 && h < H;
            for (int j = 0; j < kw; ++j) {
                const int w = w0 + j;
                T v{};  // +0.0 for every storage type
                if (hin && w >= 0 && w < W) v = xc[(long long)h * W + w];
                out[(long long)(i * kw + j) * Q] = v;
            }
        }
    }
}

// The adjoint of im2col: each input element (n, c, h, w) sums the column entries it was copied
// to, in a fixed order (no atomics: deterministic). Accumulates in cd_acc<T>.
// grid: (ceil(H*W / blockDim.x), min(N*C, 65535)); rows (n, c) beyond gridDim.y loop.
template <typename T>
__global__ void col2im(const T* __restrict__ col, T* __restrict__ x, int N, int C, int H, int W,
                       int kh, int kw, int sh, int sw, int ph, int pw, int Ho, int Wo) {
    typedef typename cd_acc<T>::type A;
    const int hw = blockIdx.x * blockDim.x + threadIdx.x;
    if (hw >= H * W) return;
    const int h = hw / W, w = hw - h * W;
    const long long Q = (long long)N * Ho * Wo;
    for (long long row = blockIdx.y; row < (long long)N * C; row += gridDim.y) {
        const int n = (int)(row / C), c = (int)(row - (long long)n * C);
        const T* cc = col + (long long)c * kh * kw * Q + (long long)n * Ho * Wo;
        A acc = 0;
        for (int i = 0; i < kh; ++i) {
            const int hh = h + ph - i;  // = oh * sh for the output row that saw h at offset i
            if (hh < 0) break;
            const int oh = hh / sh;
            if (oh * sh != hh || oh >= Ho) continue;
            for (int j = 0; j < kw; ++j) {
                const int ww = w + pw - j;
                if (ww < 0) break;
                const int ow = ww / sw;
                if (ow * sw != ww || ow >= Wo) continue;
                acc += cd_load(cc[(long long)(i * kw + j) * Q + (long long)oh * Wo + ow]);
            }
        }
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
