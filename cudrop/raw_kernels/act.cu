// Element-wise kernels (activations, a same-shape add), 16-byte accesses through accum.cuh's
// cd_map. Launch: any 1-D grid (grid-stride loops); every array 16-byte aligned.
//
// ReLU backward in one pass: gx = g where the forward's output y was positive, an exact 0
// elsewhere, in g's dtype. (cupy.where over a comparison took two passes and a bool temporary,
// and promoted bfloat16 gradients to float32 through the scalar 0: profiled on the H200.)
#include "accum.cuh"

template <typename T>
__global__ void relu_bwd(const T* __restrict__ y, const T* __restrict__ g, T* __restrict__ gx,
                         long long n) {
    typedef typename cd_acc<T>::type A;
    cd_map<true>(y, g, gx, n, [](A yv, A gv) { return yv > (A)0 ? gv : (A)0; });
}

// ReLU forward: y = max(x, 0) in x's dtype; NaN stays NaN and -0 becomes +0, as NumPy's and
// CuPy's maximum(x, 0) give (that took 21 µs a call on the bf16 MLP's 1024 x 4096 activations on the H200, 2 bytes a
// thread; PyTorch's vectorised kernel ~4).
template <typename T>
__global__ void relu_fwd(const T* __restrict__ x, T* __restrict__ y, long long n) {
    typedef typename cd_acc<T>::type A;
    cd_map<false>(x, x, y, n, [](A v, A) { return v <= (A)0 ? (A)0 : v; });
}

// a + b (same shape): the residual adds and gradient sums of transformer steps.
template <typename T>
__global__ void add2(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out,
                     long long n) {
    typedef typename cd_acc<T>::type A;
    cd_map<true>(a, b, out, n, [](A u, A v) { return u + v; });
}

// A residual unit's end, relu(a + b), in one pass: y = T(max(a + b, 0)), which is max(T(a + b),
// 0) (rounding keeps the sign), what the two ops give; NaN stays NaN, as cupy.maximum keeps it.
// Its backward is relu_bwd on y, whose one result is the gradient of both a and b.
template <typename T>
__global__ void add_relu_fwd(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y,
                             long long n) {
    typedef typename cd_acc<T>::type A;
    cd_map<true>(a, b, y, n, [](A u, A v) {
        const A s = u + v;
        return s <= (A)0 ? (A)0 : s;
    });
}

// A gated residual unit's end with its ReLU (functional/_gate.py, depth dropout in a captured
// step): y = relu(f * s + t) where the replay's scale s (a 0-d device array) is nonzero, else
// relu(t) with f unread (a skipped body's f is a stale buffer). f * s is rounded to T before
// the add, as eager mode's separate multiply rounds it, so replays stay bit-identical to
// eager steps. Backward: gt = g where y > 0, else 0; gf = gt * s (rounded to T), two outputs
// in one pass. Replaces 4 passes forward (select, multiply, add, ReLU) and 2 backward.
template <typename T>
__global__ void gate_relu_fwd(const T* __restrict__ t, const T* __restrict__ f,
                              const T* __restrict__ scale, T* __restrict__ y, long long n) {
    typedef typename cd_acc<T>::type A;
    const A s = cd_load(*scale);
    cd_map<true>(t, f, y, n, [s](A tv, A fv) {
        const A v = (s != (A)0 ? (A)cd_load(cd_store<T>(cd_mul_rn(fv, s))) : (A)0) + tv;
        return v <= (A)0 ? (A)0 : v;
    });
}

template <typename T>
__global__ void gate_relu_bwd(const T* __restrict__ y, const T* __restrict__ g,
                              const T* __restrict__ scale, T* __restrict__ gt,
                              T* __restrict__ gf, long long n) {
    typedef typename cd_acc<T>::type A;
    constexpr int V = 16 / sizeof(T);
    const A s = cd_load(*scale);
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (long long i = first; i < n / V; i += stride) {  // 16 bytes a thread, as cd_map
        const cd_v16<T> yv = reinterpret_cast<const cd_v16<T>*>(y)[i];
        const cd_v16<T> gv = reinterpret_cast<const cd_v16<T>*>(g)[i];
        cd_v16<T> a, b;
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const A v = cd_load(yv.v[k]) > (A)0 ? (A)cd_load(gv.v[k]) : (A)0;
            a.v[k] = cd_store<T>(v);
            b.v[k] = cd_store<T>(v * s);
        }
        reinterpret_cast<cd_v16<T>*>(gt)[i] = a;
        reinterpret_cast<cd_v16<T>*>(gf)[i] = b;
    }
    for (long long i = n / V * V + first; i < n; i += stride) {
        const A v = cd_load(y[i]) > (A)0 ? (A)cd_load(g[i]) : (A)0;
        gt[i] = cd_store<T>(v);
        gf[i] = cd_store<T>(v * s);
    }
}

// Where a gated body starts, backward: the body's input gradient where the replay ran the body
// (scale != 0), exact zeros where it skipped it (a skipped body leaves a stale gradient buffer).
// One pass; cupy.where over a comparison took two kernels a gated unit.
template <typename T>
__global__ void gate_in_bwd(const T* __restrict__ g, const T* __restrict__ scale,
                            T* __restrict__ gx, long long n) {
    typedef typename cd_acc<T>::type A;
    const bool run = cd_load(*scale) != (A)0;
    cd_map<false>(g, g, gx, n, [run](A gv, A) { return run ? gv : (A)0; });
}

// GELU, tanh approximation, in cd_acc<T>: y = 0.5 x (1 + t), t = tanh(sqrt(2/pi) (x + 0.044715
// x^3)), and its backward from x alone (t recomputed, no float32 t kept between the passes).
// The composed CuPy version took 6 float32 passes forward and 9 backward (GPT's MLP, 8192 x
// 4096 bf16, on an H200: ~6 ms of a 46 ms step). x is multiplied in one factor at a time: x * x
// overflows for huge |x|, where 1 - t * t is exactly 0 and 0 * inf would make the gradient NaN.
template <typename A>
__device__ __forceinline__ A gelu_t(A x) {
    const A c = (A)0.7978845608028654;  // sqrt(2 / pi)
    return cd_tanh(c * (x + (A)0.044715 * x * x * x));
}

template <typename T>
__global__ void gelu_tanh_fwd(const T* __restrict__ x, T* __restrict__ y, long long n) {
    typedef typename cd_acc<T>::type A;
    cd_map<false>(x, x, y, n, [](A v, A) { return (A)0.5 * v * ((A)1 + gelu_t(v)); });
}

template <typename T>
__global__ void gelu_tanh_bwd(const T* __restrict__ x, const T* __restrict__ g,
                              T* __restrict__ gx, long long n) {
    typedef typename cd_acc<T>::type A;
    cd_map<true>(x, g, gx, n, [](A v, A gv) {
        const A t = gelu_t(v);
        const A u = ((A)1 - t * t) * (A)0.7978845608028654;
        const A dt = u + (u * (A)(3 * 0.044715) * v) * v;
        return gv * ((A)0.5 * ((A)1 + t) + (A)0.5 * v * dt);
    });
}

#ifdef CUDROP_INSTANTIATE
#define CD_INST(T) template __global__ void relu_fwd<T>(const T*, T*, long long); \
    template __global__ void relu_bwd<T>(const T*, const T*, T*, long long); \
    template __global__ void add2<T>(const T*, const T*, T*, long long); \
    template __global__ void add_relu_fwd<T>(const T*, const T*, T*, long long); \
    template __global__ void gate_relu_fwd<T>(const T*, const T*, const T*, T*, long long); \
    template __global__ void gate_relu_bwd<T>(const T*, const T*, const T*, T*, T*, long long); \
    template __global__ void gate_in_bwd<T>(const T*, const T*, T*, long long); \
    template __global__ void gelu_tanh_fwd<T>(const T*, T*, long long); \
    template __global__ void gelu_tanh_bwd<T>(const T*, const T*, T*, long long);
CD_INST(float)
CD_INST(double)
CD_INST(cd_f16)
CD_INST(cd_bf16)
#endif
