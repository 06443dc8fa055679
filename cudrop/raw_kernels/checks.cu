// Argument checks that never make the host wait (cudrop/_checks.py). A check kernel records the
// first failure in a persistent per-device error record; the host reads the record only at its
// next check point (cudrop.check_errors), where it raises.
//
// The record is 4 unsigned 64-bit words: [0] 0 while clean, 1 once a failure is recorded;
// [1] the check's id (cudrop/_checks.py keeps what it means: op, argument, shape, dtype, range);
// [2] the flat position of the bad element; [3] its value widened to 64 bits (sign-extended for
// a signed dtype; the host reads the word back by the id's dtype). The host reads the record
// only after the launches before it on its stream have finished, so the words are complete.
// The first failure wins: a launch claims the record with atomicCAS on word 0, so a later
// launch in stream order never overwrites an earlier one; within one launch, each block reports
// the lowest bad position of its contiguous chunk, and the first block to claim wins.

#define CD_CHECK_THREADS 256
#define CD_CHECK_CHUNK 4096  // elements per block: 16 per thread, read coalesced

template <typename I>
__device__ __forceinline__ bool cd_outside(I v, long long low, long long high) {
    if ((I)(-1) < (I)0) {  // signed: every value fits a long long
        const long long s = (long long)v;
        return s < low || s >= high;
    }
    // unsigned (up to 64 bits): compare without converting a large value to a negative one
    const unsigned long long u = (unsigned long long)v;
    if (high <= 0) return true;
    if (low > 0 && u < (unsigned long long)low) return true;
    return u >= (unsigned long long)high;
}

// Launch ceil(n / CD_CHECK_CHUNK) blocks of CD_CHECK_THREADS threads; idx is contiguous.
template <typename I>
__global__ void check_index_range(const I* __restrict__ idx, long long n, long long low,
                                  long long high, unsigned long long check_id,
                                  unsigned long long* __restrict__ record) {
    const long long start = (long long)blockIdx.x * CD_CHECK_CHUNK;
    const long long end = start + CD_CHECK_CHUNK < n ? start + CD_CHECK_CHUNK : n;
    long long first = end;  // this thread's lowest bad position (its positions only increase)
    for (long long i = start + threadIdx.x; i < end; i += CD_CHECK_THREADS) {
        if (cd_outside(idx[i], low, high)) { first = i; break; }
    }
    for (int off = 16; off > 0; off >>= 1) {
        const long long o = __shfl_down_sync(0xffffffffu, first, off);
        first = o < first ? o : first;
    }
    __shared__ long long warp_first[CD_CHECK_THREADS / 32];
    if ((threadIdx.x & 31) == 0) warp_first[threadIdx.x >> 5] = first;
    __syncthreads();
    if (threadIdx.x != 0) return;
    for (int w = 1; w < CD_CHECK_THREADS / 32; ++w) first = warp_first[w] < first ? warp_first[w] : first;
    if (first >= end) return;
    if (atomicCAS(record, 0ull, 1ull) != 0ull) return;  // an earlier failure holds the record
    record[1] = check_id;
    record[2] = (unsigned long long)first;
    record[3] = (unsigned long long)(long long)idx[first];
}

#ifdef CUDROP_INSTANTIATE  // explicit instances for the nvcc compile check (NVRTC uses name_expressions)
#define CD_INST(I) \
    template __global__ void check_index_range<I>(const I*, long long, long long, long long, \
        unsigned long long, unsigned long long*);
CD_INST(signed char) CD_INST(short) CD_INST(int) CD_INST(long long)
CD_INST(unsigned char) CD_INST(unsigned short) CD_INST(unsigned int) CD_INST(unsigned long long)
#endif
