// The AVX2 level (x86-64-v3: AVX2, FMA, F16C, BMI1/2): 32-byte vectors, 8 floats.
#include "cpu/isa_prelude.h"

#if ATTNOPS_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,movbe")
#define ATTNOPS_ISA avx2
#define ATTNOPS_VEC_BYTES 32
#define ATTNOPS_X86_SIMD 1
#include "cpu/kernels/all.h"
#pragma GCC pop_options

ATTNOPS_DEFINE_CPU_KERNELS(avx2)
#endif
