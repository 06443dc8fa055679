// CUDA's function qualifiers for the headers that tests also compile for the CPU with the system
// C++ compiler (philox.cuh, slice.cuh, gyro.cuh), to compare their integer arithmetic with the
// Python on machines without a GPU: in that build the qualifiers mean nothing.
#pragma once

#ifndef __CUDACC__
#define __host__
#define __device__
#define __forceinline__ inline
#endif
