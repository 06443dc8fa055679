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
// The host keeps B τ below 2**64; I (unsigned) must hold B τ.
template <typename I>
__host__ __device__ __forceinline__ I cd_gyro_slot(I row, I tau, I total) {
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

// Word w of slot `slot`'s row of the keep table: bit b says whether the sub-network in the slot
// at `step` keeps unit 32 w + b (0 from n_units on). One Philox call per four units.
__host__ __device__ __forceinline__ unsigned int cd_gyro_table_word(
        unsigned int seed, unsigned int layer, unsigned int step, unsigned long long slot,
        unsigned long long w, unsigned long long n_units, unsigned long long sigma,
        unsigned long long tau, unsigned long long period, bool random_sched,
        unsigned int thresh) {
    const unsigned int subnet = cd_gyro_subnet(seed, layer, step, slot, sigma, tau, period,
                                               random_sched);
    unsigned int bits = 0;
    for (int q = 0; q < 8; ++q) {
        const unsigned long long quad = 8 * w + q;
        if (4 * quad >= n_units) break;
        const cd_u4 r = cd_gyro_words(seed, layer, subnet, quad);
        for (int j = 0; j < 4; ++j)
            if (4 * quad + j < n_units && cd_word(r, j) >= thresh) bits |= 1u << (4 * q + j);
    }
    return bits;
}

// The keep bits of elements i0 .. i0 + V - 1 (bit j for element i0 + j; none from n on) of a
// C-contiguous array viewed as rows of row_len elements, element e of a row on unit
// (e / inner) % n_units; row r is global row row0 + r of a batch of `total` rows, whose row
// groups the slots follow. The bits come from the keep table (slot s's words from s * words).
// The first element's coordinates take divisions, the next follow by increments; I is the
// index type, 32 bits where n + V and total * τ allow (then cd_gyro_slot's product fits; 64-bit
// divisions held the per-element kernel at 24 µs a 1024 x 4096 bf16 array on the H200, where a
// copy takes ~5).
template <int V, typename I>
__host__ __device__ __forceinline__ unsigned int cd_gyro_table_keep(
        I i0, I n, I row_len, I inner, I n_units, I row0, I total, I tau,
        const unsigned int* table, unsigned long long words) {
    I row = i0 / row_len;
    I e = i0 - row * row_len;
    I c = e % inner;
    I u = (e / inner) % n_units;
    const unsigned int* trow = table + cd_gyro_slot<I>(row0 + row, tau, total) * words;
    // one unit an element (units on the last axis), the V in one row and one table word: a
    // shift (the common case, e.g. an MLP's (batch, units): no per-element walk)
    if (inner == 1 && i0 + V <= n && e + V <= row_len && u + V <= n_units && (u & 31) + V <= 32)
        return (trow[u >> 5] >> (u & 31)) & ((1u << V) - 1u);
    unsigned int keep = 0;
#pragma unroll
    for (int j = 0; j < V; ++j) {
        if (i0 + j >= n) break;
        keep |= ((trow[u >> 5] >> (u & 31)) & 1u) << j;
        // a row holds whole runs of n_units * inner elements, so c and u wrap to 0 with e
        if (++c == inner) {
            c = 0;
            if (++u == n_units) u = 0;
        }
        if (++e == row_len) {
            e = 0;
            ++row;
            trow = table + cd_gyro_slot<I>(row0 + row, tau, total) * words;
        }
    }
    return keep;
}
