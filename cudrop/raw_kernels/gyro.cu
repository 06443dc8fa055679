// Element gyro dropout with the schedule decided on the device (a captured CUDA graph's step
// lives there): y = x * keep / q, where the keep bit of an element is its row group's
// sub-network's bit for its unit. gyro_keep_table derives the step's sub-networks from (seed,
// layer, step) -- reading the step from step_ptr when it is not null, so a replayed graph uses
// the step the host wrote last -- and writes their keep bits, one row of words per slot; then
// gyro_apply masks with that table, forward and backward (the op is its own backward: grad *
// keep / q), so the mask is drawn once a step.
//
// x is C-contiguous, viewed as rows (axis 0) of row_len elements; the unit of element e of a row
// is (e / inner) % n_units (units on one axis, inner = the product of the axes after it). Row r
// is global row row0 + r of a batch of `total` rows (a data-parallel rank's part; row0 = 0 and
// total = the rows otherwise), whose τ row groups the slots follow (gyro.cuh, cd_gyro_slot).
#include "philox.cuh"
#include "dtypes.cuh"
#include "gyro.cuh"

// Thread t writes word t of the (slots, words) table: slot t / words, units 32 (t % words) on.
extern "C" __global__ void gyro_keep_table(unsigned int* __restrict__ table, long long slots,
                                           long long words, unsigned long long n_units,
                                           unsigned int seed, unsigned int layer,
                                           unsigned int step,
                                           const unsigned int* __restrict__ step_ptr,
                                           unsigned long long sigma, unsigned long long tau,
                                           unsigned long long period, int random_sched,
                                           unsigned int thresh) {
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= slots * words) return;
    const unsigned int step_now = step_ptr ? *step_ptr : step;
    const long long s = t / words;
    table[t] = cd_gyro_table_word(seed, layer, step_now, (unsigned long long)s,
                                  (unsigned long long)(t - s * words), n_units, sigma, tau,
                                  period, random_sched != 0, thresh);
}

// Thread t owns the V = 16 / sizeof(T) elements from V t: their keep bits from the table
// (cd_gyro_table_keep, 32-bit indices where n and total * τ allow), one 16-byte load and store
// (x and y are 16-byte aligned: the host copies a misaligned x, y is fresh), the last partial
// run one element at a time. Dropped cells are exact zeros: an inf or NaN there does not leak.
// `scale` is 1/q rounded to the dtype (x * s in the dtype, as the host path computes
// x * dtype(1/q)).
template <typename T>
__global__ void gyro_apply(const T* __restrict__ x, T* __restrict__ y, long long n,
                           long long row_len, long long inner, long long n_units, long long row0,
                           long long total, unsigned long long tau,
                           const unsigned int* __restrict__ table, long long words,
                           double scale) {
    constexpr int V = 16 / sizeof(T);
    const long long i0 = V * ((long long)blockIdx.x * blockDim.x + threadIdx.x);
    if (i0 >= n) return;
    typedef unsigned int u32;
    typedef unsigned long long u64;
    const unsigned int keep = n + V < (1ll << 32) && (u64)total * tau < (1ull << 32)
        ? cd_gyro_table_keep<V, u32>((u32)i0, (u32)n, (u32)row_len, (u32)inner, (u32)n_units,
                                     (u32)row0, (u32)total, (u32)tau, table, words)
        : cd_gyro_table_keep<V, u64>(i0, n, row_len, inner, n_units, row0, total, tau, table,
                                     words);
    if (i0 + V <= n) {
        typedef cd_vec<T, V> vec_t;
        const vec_t in = reinterpret_cast<const vec_t*>(x)[i0 / V];
        vec_t out;
#pragma unroll
        for (int j = 0; j < V; ++j) out.v[j] = cd_scale_or_zero(in.v[j], scale, (keep >> j) & 1u);
        reinterpret_cast<vec_t*>(y)[i0 / V] = out;
    } else {
        for (int j = 0; j < V && i0 + j < n; ++j)
            y[i0 + j] = cd_scale_or_zero(x[i0 + j], scale, (keep >> j) & 1u);
    }
}

// Block-wise gyro decided on the device: ids[r] = the sub-network of row block r at the step
// (step_ptr's value when not null), the row coordinate the block-mask kernel (masks.cu) then
// draws row block r's unit-block bits with; so the mask of a replayed graph follows the step the
// host wrote last, equal bit for bit to the host schedule's (gyro_schedule.blockwise_row_ids).
extern "C" __global__ void gyro_block_row_ids(unsigned int* __restrict__ ids, long long n,
                                              unsigned long long offset,
                                              unsigned long long total, unsigned int seed,
                                              unsigned int layer, unsigned int step,
                                              const unsigned int* __restrict__ step_ptr,
                                              unsigned long long sigma, unsigned long long tau,
                                              unsigned long long period, int random_sched) {
    const long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= n) return;
    const unsigned int step_now = step_ptr ? *step_ptr : step;
    const unsigned long long slot = cd_gyro_block_slot(step_now, (unsigned long long)r, offset,
                                                       total, tau);
    ids[r] = cd_gyro_subnet(seed, layer, step_now, slot, sigma, tau, period, random_sched != 0);
}

#ifdef CUDROP_INSTANTIATE  // explicit instances for the nvcc compile check (NVRTC uses name_expressions)
#define CD_INST(T) \
    template __global__ void gyro_apply<T>(const T*, T*, long long, long long, long long, \
        long long, long long, long long, unsigned long long, const unsigned int*, long long, \
        double);
CD_INST(float) CD_INST(double) CD_INST(cd_f16) CD_INST(cd_bf16)
#endif
