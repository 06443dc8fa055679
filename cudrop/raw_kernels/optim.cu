// Fused optimizer updates: one pass per parameter reads the gradient, the state and the float32
// master copy (16-bit parameters) and writes them and the parameter back, where the unfused
// update made ~7 elementwise passes with temporaries (profiled on the H200: 1.4 of a 2.0 ms bf16
// MLP step). The arithmetic is the unfused update's, operation by operation, in the state type S
// (float for 16-bit and float32 parameters, double for double), compiled with --fmad=false so no
// multiply-add is contracted: results are bit-identical to the CuPy expressions in sgd.py and
// adam.py. Per-step scalars (lr, Adam's bias corrections) come as a device pointer (a captured
// step's graph scalar, read when the kernel runs) or, when the pointer is null, by value.
// `error`: word 0 of the device's error record (raw_kernels/checks.cu), or null: when a check
// earlier in the stream recorded a bad index, the step's gradients are garbage and the update is
// skipped, so the parameters and the state stay as they were until the host raises the error.
// (A loss scaler passes its overflow flag here instead, combined with the record.)
// `inv_scale`: null, or 1 / loss scale, multiplied into each gradient as it is read (the
// unfused update's g.astype(S) * inv_scale: float16 gradients are unscaled in float32).
//
// One launch updates up to CD_MULTI parameters of one dtype (one kernel per parameter launched
// 173 for a ResNet-56 step, ~1.7 µs of kernel and ~15 µs of host time apiece on the H200). The
// parameters come in a table passed by value (2.9 KB of kernel parameters): per parameter its
// pointers, its size, whether its first state array is new, and the end of its run of blocks
// (cumulative), which tells each block its parameter; the blocks of one parameter walk it with
// a grid-stride loop of their own. Launch: as many blocks as the table's last block end.
#include "accum.cuh"

template <typename S> __device__ __forceinline__ S cd_step_scalar(const S* ptr, double value) {
    return ptr ? *ptr : (S)value;
}

// One SGD update of one element (w from the master copy or the parameter; b the momentum slot,
// read and written only with momentum).
template <typename S>
__device__ __forceinline__ S sgd_one(S w, S g, S* b, S lr, S mu, S wd, S inv, bool scaled,
                                     bool decay, bool first, bool nesterov) {
    if (scaled) g = g * inv;
    if (decay) g = g + wd * w;
    if (b) {
        const S v = first ? g : mu * *b + g;
        *b = v;
        g = nesterov ? g + mu * v : v;
    }
    return w - lr * g;
}

// The update of elements [0, n) of one parameter by the threads `start`, `start + stride`, ...
// master: the float32 copy that trains for 16-bit T, else null (p itself is updated)
// buf: the momentum buffer, or null without momentum; first: buf is new and becomes g (as the
// unfused update's copy does, signed zeros included)
// Groups of V = 16 / sizeof(S) elements move as one access per array when every array is aligned
// to its group (checked here, so views still work through the scalar loop): per-element 2-byte
// accesses ran the bf16 MLP's update (37.8M parameters, float32 master and momentum) at 222 µs
// a step on the H200, 3.4 TB/s.
template <typename T, typename S>
__device__ __forceinline__ void sgd_range(T* __restrict__ p, S* __restrict__ master,
                                          const T* __restrict__ grad, S* __restrict__ buf,
                                          bool first, long long n, long long start,
                                          long long stride, S lr, S mu, S wd, S inv, bool scaled,
                                          bool decay, bool nesterov) {
    constexpr int V = 16 / sizeof(S);
    const bool vec = ((size_t)p % (sizeof(T) * V) | (size_t)grad % (sizeof(T) * V) |
                      (size_t)master % 16 | (size_t)buf % 16) == 0;
    const long long groups = vec ? n / V : 0;
    for (long long i = start; i < groups; i += stride) {
        cd_vec<T, V> pv;
        cd_vec<S, V> mv, bv;
        const cd_vec<T, V> gv = reinterpret_cast<const cd_vec<T, V>*>(grad)[i];
        if (master) mv = reinterpret_cast<const cd_vec<S, V>*>(master)[i];
        else pv = reinterpret_cast<const cd_vec<T, V>*>(p)[i];
        if (buf) bv = reinterpret_cast<const cd_vec<S, V>*>(buf)[i];
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const S w = sgd_one(master ? mv.v[k] : (S)cd_load(pv.v[k]), (S)cd_load(gv.v[k]),
                                buf ? &bv.v[k] : (S*)nullptr, lr, mu, wd, inv, scaled, decay,
                                first, nesterov);
            mv.v[k] = w;
            pv.v[k] = cd_store<T>(w);
        }
        if (master) reinterpret_cast<cd_vec<S, V>*>(master)[i] = mv;
        if (buf) reinterpret_cast<cd_vec<S, V>*>(buf)[i] = bv;
        reinterpret_cast<cd_vec<T, V>*>(p)[i] = pv;
    }
    for (long long i = groups * V + start; i < n; i += stride) {
        const S w = sgd_one(master ? master[i] : (S)cd_load(p[i]), (S)cd_load(grad[i]),
                            buf ? buf + i : (S*)nullptr, lr, mu, wd, inv, scaled, decay, first,
                            nesterov);
        if (master) master[i] = w;
        p[i] = cd_store<T>(w);
    }
}

#define CD_MULTI 48
struct cd_multi_table {
    long long n[CD_MULTI];
    long long block_end[CD_MULTI];
    // state1: SGD's momentum buffer (or null) / Adam's m; state2: Adam's v (SGD: unused)
    unsigned long long p[CD_MULTI], master[CD_MULTI], grad[CD_MULTI], state1[CD_MULTI],
        state2[CD_MULTI];
    // a gated parameter's flag in a captured step (cudrop/graph.py: unsigned, 0 when this
    // replay skips its unit: its update is skipped too), or null
    unsigned long long gate[CD_MULTI];
    int first[CD_MULTI];
};

// The parameter of this block and the block's place among that parameter's blocks:
// (index, first thread, thread stride) of a grid-stride walk over it.
struct cd_multi_slot { int i; long long start, stride; };

// Whether parameter i's unit is skipped in this replay (its gate flag is 0): no update.
__device__ __forceinline__ bool cd_multi_skipped(const cd_multi_table& t, int i) {
    return t.gate[i] && *reinterpret_cast<const unsigned*>(t.gate[i]) == 0u;
}

__device__ __forceinline__ cd_multi_slot cd_multi_find(const cd_multi_table& t, int count) {
    int i = 0;
    while (i < count - 1 && (long long)blockIdx.x >= t.block_end[i]) ++i;
    const long long first_block = i ? t.block_end[i - 1] : 0;
    return {i, ((long long)blockIdx.x - first_block) * blockDim.x + threadIdx.x,
            (t.block_end[i] - first_block) * blockDim.x};
}

// This CTA's part of the table (cd_multi_find), or i = -1 when it has nothing to do: a check
// earlier in the step flagged an error (the update is skipped, the error reported at the next
// host read), or its parameter's unit is skipped in this replay.
__device__ __forceinline__ cd_multi_slot cd_multi_claim(const cd_multi_table& t, int count,
                                                        const unsigned long long* error) {
    if (error && *error) return {-1, 0, 0};
    const cd_multi_slot at = cd_multi_find(t, count);
    return cd_multi_skipped(t, at.i) ? cd_multi_slot{-1, 0, 0} : at;
}

template <typename T>
__global__ void sgd_step(const cd_multi_table t, int count,
                               const typename cd_acc<T>::type* __restrict__ lr_ptr,
                               double lr_value, double momentum, double weight_decay,
                               int nesterov, const unsigned long long* __restrict__ error,
                               const float* __restrict__ inv_scale) {
    typedef typename cd_acc<T>::type S;
    const cd_multi_slot at = cd_multi_claim(t, count, error);
    const int i = at.i;
    if (i < 0) return;
    sgd_range<T, S>(reinterpret_cast<T*>(t.p[i]), reinterpret_cast<S*>(t.master[i]),
                    reinterpret_cast<const T*>(t.grad[i]), reinterpret_cast<S*>(t.state1[i]),
                    t.first[i] != 0, t.n[i], at.start, at.stride,
                    cd_step_scalar(lr_ptr, lr_value), (S)momentum, (S)weight_decay,
                    inv_scale ? (S)*inv_scale : S(1), inv_scale != nullptr, weight_decay != 0.0,
                    nesterov);
}

// Adam / AdamW: step_size = lr / (1 - b1^t), bc2 = sqrt(1 - b2^t), decay = 1 - lr wd (AdamW);
// c1 = 1 - b1 and c2 = 1 - b2 as the host computed them in double.
struct cd_adam_hyper { double beta1, beta2, c1, c2, eps, weight_decay; int decoupled; };

template <typename T, typename S>
__device__ __forceinline__ void adam_range(T* __restrict__ p, S* __restrict__ master,
                                           const T* __restrict__ grad, S* __restrict__ m,
                                           S* __restrict__ v, long long n, long long start,
                                           long long stride, S step_size, S bc2, S decay,
                                           const cd_adam_hyper h, const float* inv_scale) {
    const S inv = inv_scale ? (S)*inv_scale : S(1);
    const S b1 = (S)h.beta1, b2 = (S)h.beta2, s1 = (S)h.c1, s2 = (S)h.c2, e = (S)h.eps;
    const S wd = (S)h.weight_decay;
    for (long long i = start; i < n; i += stride) {
        S w = master ? master[i] : cd_load(p[i]);
        S g = cd_load(grad[i]);
        if (inv_scale) g = g * inv;
        if (h.weight_decay != 0.0) {
            if (h.decoupled) w = w * decay;
            else g = g + wd * w;
        }
        const S mi = m[i] * b1 + s1 * g;
        const S vi = v[i] * b2 + s2 * (g * g);
        m[i] = mi;
        v[i] = vi;
        S denom = sqrt(vi);
        denom = denom / bc2;
        denom = denom + e;
        w = w - step_size * (mi / denom);
        if (master) master[i] = w;
        p[i] = cd_store<T>(w);
    }
}

// Adam over the table's parameters, all at one step count (state1 is m, state2 is v).
template <typename T>
__global__ void adam_step(const cd_multi_table t, int count,
                                const typename cd_acc<T>::type* __restrict__ step_size_ptr,
                                double step_size_value,
                                const typename cd_acc<T>::type* __restrict__ bc2_ptr,
                                double bc2_value,
                                const typename cd_acc<T>::type* __restrict__ decay_ptr,
                                double decay_value, double beta1, double beta2, double c1,
                                double c2, double eps, double weight_decay, int decoupled,
                                const unsigned long long* __restrict__ error,
                                const float* __restrict__ inv_scale) {
    typedef typename cd_acc<T>::type S;
    const cd_multi_slot at = cd_multi_claim(t, count, error);
    const int i = at.i;
    if (i < 0) return;
    adam_range(reinterpret_cast<T*>(t.p[i]), reinterpret_cast<S*>(t.master[i]),
               reinterpret_cast<const T*>(t.grad[i]), reinterpret_cast<S*>(t.state1[i]),
               reinterpret_cast<S*>(t.state2[i]), t.n[i], at.start, at.stride,
               cd_step_scalar(step_size_ptr, step_size_value), cd_step_scalar(bc2_ptr, bc2_value),
               cd_step_scalar(decay_ptr, decay_value),
               cd_adam_hyper{beta1, beta2, c1, c2, eps, weight_decay, decoupled}, inv_scale);
}

#ifdef CUDROP_INSTANTIATE
#define CD_INST(T)                                                                              \
    template __global__ void sgd_step<T>(const cd_multi_table, int, const cd_acc<T>::type*,    \
                                         double, double, double, int,                          \
                                         const unsigned long long*, const float*);             \
    template __global__ void adam_step<T>(const cd_multi_table, int, const cd_acc<T>::type*,   \
                                          double, const cd_acc<T>::type*, double,              \
                                          const cd_acc<T>::type*, double, double, double,      \
                                          double, double, double, double, int,                 \
                                          const unsigned long long*, const float*);
CD_INST(float)
CD_INST(double)
CD_INST(cd_f16)
CD_INST(cd_bf16)
#endif
