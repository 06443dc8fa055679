// Element gyro dropout with the schedule decided on the device (a captured CUDA graph's step
// lives there): y = x * keep / q, where the keep bit of an element is its row group's
// sub-network's bit for its unit. The kernel derives the sub-networks from (seed, layer, step)
// itself, reading the step from step_ptr when it is not null, so a replayed graph applies the
// sub-networks of the step the host wrote last. The op is its own backward (grad * keep / q):
// the same kernel serves both.
//
// x is C-contiguous, viewed as rows (axis 0) of row_len elements; the unit of element e of a row
// is (e / inner) % n_units (units on one axis, inner = the product of the axes after it). Row r
// is global row row0 + r of a batch of `total` rows (a data-parallel rank's part; row0 = 0 and
// total = the rows otherwise), whose τ row groups the slots follow (gyro.cuh, cd_gyro_slot).
#include "philox.cuh"
#include "dtypes.cuh"
#include "gyro.cuh"

// Thread t owns elements 4t .. 4t + 3: their keep bits from cd_gyro_keep4 (gyro.cuh), one
// vector load and store where all four exist (x and y aligned, raw_kernels.vector_aligned).
// Dropped cells are exact zeros: an inf or NaN there does not leak. `scale` is 1/q rounded to
// the dtype (x * s in the dtype, as the host path computes x * dtype(1/q)).
template <typename T>
__global__ void gyro_apply(const T* __restrict__ x, T* __restrict__ y, long long n,
                           long long row_len, long long inner, long long n_units, long long row0,
                           long long total, unsigned int seed, unsigned int layer,
                           unsigned int step, const unsigned int* __restrict__ step_ptr,
                           unsigned long long sigma, unsigned long long tau,
                           unsigned long long period, int random_sched, unsigned int thresh,
                           double scale) {
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long i0 = 4 * t;
    if (i0 >= n) return;
    // one uniform branch; every thread of a warp loads the same word (one broadcast load)
    const unsigned int step_now = step_ptr ? *step_ptr : step;
    const unsigned int keep = cd_gyro_keep4(i0, n, row_len, inner, n_units, row0, total, seed,
                                            layer, step_now, sigma, tau, period, random_sched != 0,
                                            thresh);
    if (i0 + 3 < n) {
        const cd_vec4<T> in = reinterpret_cast<const cd_vec4<T>*>(x)[t];
        cd_vec4<T> out;
#pragma unroll
        for (int j = 0; j < 4; ++j) out.v[j] = cd_scale_or_zero(in.v[j], scale, (keep >> j) & 1u);
        reinterpret_cast<cd_vec4<T>*>(y)[t] = out;
    } else {
#pragma unroll
        for (int j = 0; j < 4; ++j)
            if (i0 + j < n) y[i0 + j] = cd_scale_or_zero(x[i0 + j], scale, (keep >> j) & 1u);
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
        long long, long long, long long, unsigned int, unsigned int, unsigned int, \
        const unsigned int*, unsigned long long, unsigned long long, unsigned long long, int, \
        unsigned int, double);
CD_INST(float) CD_INST(double) CD_INST(cd_f16) CD_INST(cd_bf16)
#endif
