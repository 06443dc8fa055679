// SliceOut's slice on the device: the start of the kept slice and the two index maps between a
// full units axis and the compact (kept-only) axis. Pure integer functions of host-checked
// arguments, the same arithmetic as cudrop/variants/sliceout.py (slice_start, slice_ranges);
// __host__ __device__ so that tests/test_sliceout_device.py can compile them for the CPU and
// compare them with the Python functions on machines without a GPU.
#pragma once

#include "hostdev.cuh"

// The start from the Philox word at (seed, layer, step, TAG_SLICE, row 0, col 0): index
// floor(word * count / 2**32) among the `count` valid starts (num_starts), exactly, times
// `unit` (align, or 1 in wrap mode). A slice that keeps every unit is the range (0, n) whatever
// the word (slice_ranges), so its start is 0: the compact order is then the identity.
// count <= n < 2**31 (the host checks), so the 64-bit product cannot overflow.
__host__ __device__ __forceinline__ long long cd_slice_start_of(unsigned int word, long long n,
                                                                long long keep, long long count,
                                                                long long unit) {
    if (keep == n) return 0;
    return (long long)(((unsigned long long)word * (unsigned long long)count) >> 32) * unit;
}

// The full-axis unit at compact position j (0 <= j < keep): the slice continues past unit n - 1
// at unit 0, so position j is unit (start + j) mod n; start < n and j < keep <= n, so one
// subtraction does the mod.
__host__ __device__ __forceinline__ long long cd_slice_unit(long long start, long long j,
                                                            long long n) {
    const long long u = start + j;
    return u >= n ? u - n : u;
}

// The compact position of full-axis unit u, or -1 where u is dropped: the inverse of
// cd_slice_unit.
__host__ __device__ __forceinline__ long long cd_slice_pos(long long start, long long u,
                                                           long long n, long long keep) {
    long long pos = u - start;
    if (pos < 0) pos += n;
    return pos < keep ? pos : -1;
}
