// Reductions along the last axis of a contiguous (rows, n) array, one warp per row,
// accumulating in cd_acc<T> (float for the 16-bit types). Launch: blocks of whole warps, any grid
// (grid-stride loop over rows).
//
// Softmax: y = exp(x - max) / sum(exp(x - max)), and its backward gx = y * (g - sum(g * y)). The
// composed CuPy version widened the input to float32 and made 6
// passes forward and 5 backward over the array (GPT, d = 1024, context 256, batch 32, on an
// H200: ~9 ms of a 46 ms bf16 step in float32 temporaries); here the row is read 3 times
// (forward) or twice (backward), from L1/L2 for rows of a few KB, and written once.
#include "accum.cuh"

template <typename T>
__global__ void softmax_fwd(const T* __restrict__ x, T* __restrict__ y, long long rows, int n) {
    typedef typename cd_acc<T>::type A;
    cd_warp_rows(rows, [&](long long r, int lane) {
        const T* xr = x + r * n;
        A m = cd_neg_inf(A());
        for (int j = lane; j < n; j += 32) m = cd_max(m, (A)cd_load(xr[j]));
        m = cd_warp_max(m);
        A s = 0;
        for (int j = lane; j < n; j += 32) s += cd_exp((A)cd_load(xr[j]) - m);
        s = cd_warp_sum(s);
        T* yr = y + r * n;
        for (int j = lane; j < n; j += 32)
            yr[j] = cd_store<T>(cd_exp((A)cd_load(xr[j]) - m) / s);
    });
}

template <typename T>
__global__ void softmax_bwd(const T* __restrict__ y, const T* __restrict__ g, T* __restrict__ gx,
                            long long rows, int n) {
    typedef typename cd_acc<T>::type A;
    cd_warp_rows(rows, [&](long long r, int lane) {
        const T* yr = y + r * n;
        const T* gr = g + r * n;
        A dot = 0;
        for (int j = lane; j < n; j += 32) dot += (A)cd_load(gr[j]) * (A)cd_load(yr[j]);
        dot = cd_warp_sum(dot);
        T* out = gx + r * n;
        for (int j = lane; j < n; j += 32)
            out[j] = cd_store<T>((A)cd_load(yr[j]) * ((A)cd_load(gr[j]) - dot));
    });
}

// Layer norm: xhat = (x - mean) * inv_std, inv_std = 1 / sqrt(mean((x - mean)^2) + eps) (two
// passes, as the array path), y = xhat * gamma + beta; xhat (cd_acc<T>) and inv_std are kept
// for the backward, gx = inv_std * (gxhat - mean(gxhat) - xhat * mean(gxhat * xhat)) with
// gxhat = g * gamma. gamma and beta come in cd_acc<T>; has_gamma / has_beta 0 ignore them.
// The composed version took ~10 float32 passes forward and ~12 backward (GPT bf16, profiled
// on the H200).
template <typename T>
__global__ void ln_fwd(const T* __restrict__ x, const typename cd_acc<T>::type* __restrict__ gamma,
                       const typename cd_acc<T>::type* __restrict__ beta, T* __restrict__ y,
                       typename cd_acc<T>::type* __restrict__ xhat,
                       typename cd_acc<T>::type* __restrict__ inv_std, long long rows, int n,
                       double eps, int has_gamma, int has_beta) {
    typedef typename cd_acc<T>::type A;
    cd_warp_rows(rows, [&](long long r, int lane) {
        const T* xr = x + r * n;
        A s = 0;
        for (int j = lane; j < n; j += 32) s += (A)cd_load(xr[j]);
        const A mean = cd_warp_sum(s) / (A)n;
        A q = 0;
        for (int j = lane; j < n; j += 32) {
            const A c = (A)cd_load(xr[j]) - mean;
            q += c * c;
        }
        const A is = (A)1 / cd_sqrt(cd_warp_sum(q) / (A)n + (A)eps);
        if (lane == 0) inv_std[r] = is;
        A* hr = xhat + r * n;
        T* yr = y + r * n;
        for (int j = lane; j < n; j += 32) {
            const A h = ((A)cd_load(xr[j]) - mean) * is;
            hr[j] = h;
            A v = h;
            if (has_gamma) v = v * gamma[j];
            if (has_beta) v = v + beta[j];
            yr[j] = cd_store<T>(v);
        }
    });
}

template <typename T>
__global__ void ln_bwd(const T* __restrict__ g, const typename cd_acc<T>::type* __restrict__ xhat,
                       const typename cd_acc<T>::type* __restrict__ inv_std,
                       const typename cd_acc<T>::type* __restrict__ gamma, T* __restrict__ gx,
                       long long rows, int n, int has_gamma) {
    typedef typename cd_acc<T>::type A;
    cd_warp_rows(rows, [&](long long r, int lane) {
        const T* gr = g + r * n;
        const A* hr = xhat + r * n;
        A s1 = 0, s2 = 0;
        for (int j = lane; j < n; j += 32) {
            const A gh = has_gamma ? cd_mul_rn((A)cd_load(gr[j]), gamma[j]) : (A)cd_load(gr[j]);
            s1 += gh;
            s2 += gh * hr[j];
        }
        const A m1 = cd_warp_sum(s1) / (A)n, m2 = cd_warp_sum(s2) / (A)n, is = inv_std[r];
        T* out = gx + r * n;
        for (int j = lane; j < n; j += 32) {
            const A gh = has_gamma ? cd_mul_rn((A)cd_load(gr[j]), gamma[j]) : (A)cd_load(gr[j]);
            out[j] = cd_store<T>(is * (gh - m1 - hr[j] * m2));
        }
    });
}

#ifdef CUDROP_INSTANTIATE
#define CD_INST(T) \
    template __global__ void softmax_fwd<T>(const T*, T*, long long, int); \
    template __global__ void softmax_bwd<T>(const T*, const T*, T*, long long, int); \
    template __global__ void ln_fwd<T>(const T*, const cd_acc<T>::type*, const cd_acc<T>::type*, \
        T*, cd_acc<T>::type*, cd_acc<T>::type*, long long, int, double, int, int); \
    template __global__ void ln_bwd<T>(const T*, const cd_acc<T>::type*, const cd_acc<T>::type*, \
        const cd_acc<T>::type*, T*, long long, int, int);
CD_INST(float)
CD_INST(double)
CD_INST(cd_f16)
CD_INST(cd_bf16)
#endif
