// Gyro dropout decided on the device: which sub-network a slot runs at a step, which row group
// (slot) a row belongs to, and whether a sub-network keeps a unit. Pure integer functions of
// host-checked arguments, the same arithmetic as cudrop/variants/gyro_schedule.py
// (scheduled_subnets, subnet_keep, GyroMask.row_bounds); __host__ __device__ so that
// tests/test_gyro_device.py compiles them for the CPU and compares them with the Python
// functions on machines without a GPU.
#pragma once

#include "hostdev.cuh"
#include "philox.cuh"

// Consecutive schedule: set j = step / period runs sub-networks (j mod Σ/τ) τ + slot. τ divides
// Σ (the host checks), and the id is < Σ <= 2**32, so it fits the 32-bit row coordinate.
__host__ __device__ __forceinline__ unsigned int cd_gyro_consecutive(unsigned int step,
                                                                     unsigned long long slot,
                                                                     unsigned long long sigma,
                                                                     unsigned long long tau,
                                                                     unsigned long long period) {
    const unsigned long long j = ((unsigned long long)step / period) % (sigma / tau);
    return (unsigned int)(j * tau + slot);
}

// Random schedule: floor(u Σ) with u = word / 2**32, exactly, as (word Σ) >> 32; the product is
// below 2**64 since Σ <= 2**32.
__host__ __device__ __forceinline__ unsigned int cd_gyro_random(unsigned int word,
                                                                unsigned long long sigma) {
    return (unsigned int)(((unsigned long long)word * sigma) >> 32);
}

// The sub-network in `slot` at `step` under either schedule. The random schedule's word is
// philox.uniform(seed, layer, step, TAG_SCHEDULE, τ)[slot]: mask coordinate (row 0, col slot).
__host__ __device__ __forceinline__ unsigned int cd_gyro_subnet(
        unsigned int seed, unsigned int layer, unsigned int step, unsigned long long slot,
        unsigned long long sigma, unsigned long long tau, unsigned long long period,
        bool random_sched) {
    if (random_sched)
        return cd_gyro_random(cd_mask_word(seed, layer, step, CD_TAG_SCHEDULE, 0u, slot), sigma);
    return cd_gyro_consecutive(step, slot, sigma, tau, period);
}

// Block-wise gyro: row block `r` of a batch that is row blocks offset .. of a global batch of
// `total` row blocks runs slot (step total + offset + r) mod τ (row_block_subnets), reduced
// term by term so that no product or sum leaves 64 bits (step and each remainder < 2**32).
__host__ __device__ __forceinline__ unsigned long long cd_gyro_block_slot(
        unsigned int step, unsigned long long r, unsigned long long offset,
        unsigned long long total, unsigned long long tau) {
    return (((unsigned long long)step % tau) * (total % tau) % tau + offset % tau + r % tau) % tau;
}

// The slot of row `row` of a batch of `total` rows split into τ contiguous groups: group t is
// rows [t B / τ, (t + 1) B / τ) (GyroMask.row_bounds, ragged or not: when τ divides B these are
// the groups of B / τ rows), so row r is in the largest t with t B / τ <= r, i.e. with
// t B < (r + 1) τ: t = ((r + 1) τ - 1) / B. Empty groups (B < τ) are skipped by construction.
// The host keeps B τ below 2**64.
__host__ __device__ __forceinline__ unsigned long long cd_gyro_slot(unsigned long long row,
                                                                    unsigned long long tau,
                                                                    unsigned long long total) {
    return ((row + 1) * tau - 1) / total;
}

// Sub-network `subnet`'s words for units 4 quad .. 4 quad + 3: mask coordinate (row subnet,
// col unit) at step 0, tag TAG_GYRO (one Philox call serves four consecutive units).
__host__ __device__ __forceinline__ cd_u4 cd_gyro_words(unsigned int seed, unsigned int layer,
                                                        unsigned int subnet,
                                                        unsigned long long quad) {
    return cd_philox((unsigned int)quad, subnet, 0u, CD_TAG_GYRO, seed, layer);
}

// Whether sub-network `subnet` keeps unit `unit`: its word >= threshold(p) (subnet_keep).
__host__ __device__ __forceinline__ bool cd_gyro_kept(unsigned int seed, unsigned int layer,
                                                      unsigned int subnet, unsigned long long unit,
                                                      unsigned int thresh) {
    return cd_word(cd_gyro_words(seed, layer, subnet, unit >> 2), (int)(unit & 3ull)) >= thresh;
}

// The keep bits of elements i0 .. i0 + 3 (bit j for element i0 + j; elements from n on are 0) of
// a C-contiguous array viewed as rows of row_len elements, element e of a row on unit
// (e / inner) % n_units; row r is global row row0 + r of a batch of `total` rows, whose row
// groups the slots follow. One Philox call per distinct (sub-network, four units) among the
// four -- units along the last axis share a call four at a time, and with inner > 1 neighbours
// share a unit -- plus, for the random schedule, one per distinct slot. The first element's
// coordinates take divisions, the next three follow by increments.
__host__ __device__ __forceinline__ unsigned int cd_gyro_keep4(
        long long i0, long long n, long long row_len, long long inner, long long n_units,
        long long row0, long long total, unsigned int seed, unsigned int layer,
        unsigned int step, unsigned long long sigma, unsigned long long tau,
        unsigned long long period, bool random_sched, unsigned int thresh) {
    long long row = i0 / row_len;
    long long e = i0 - row * row_len;
    long long c = e % inner;
    long long u = (e / inner) % n_units;
    unsigned long long slot = cd_gyro_slot((unsigned long long)(row0 + row), tau, total);
    unsigned int subnet = cd_gyro_subnet(seed, layer, step, slot, sigma, tau, period,
                                         random_sched);
    long long quad = u >> 2;
    cd_u4 w = cd_gyro_words(seed, layer, subnet, (unsigned long long)quad);
    unsigned int keep = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        keep |= (unsigned int)(cd_word(w, (int)(u & 3)) >= thresh) << j;
        if (j == 3 || i0 + j + 1 >= n) break;
        // a row holds whole runs of n_units * inner elements, so c and u wrap to 0 with e
        if (++c == inner) {
            c = 0;
            if (++u == n_units) u = 0;
        }
        bool fresh = false;
        if (++e == row_len) {
            e = 0;
            ++row;
            const unsigned long long s = cd_gyro_slot((unsigned long long)(row0 + row), tau,
                                                      total);
            if (s != slot) {
                slot = s;
                subnet = cd_gyro_subnet(seed, layer, step, slot, sigma, tau, period,
                                        random_sched);
                fresh = true;
            }
        }
        if (fresh || (u >> 2) != quad) {
            quad = u >> 2;
            w = cd_gyro_words(seed, layer, subnet, (unsigned long long)quad);
        }
    }
    return keep;
}
