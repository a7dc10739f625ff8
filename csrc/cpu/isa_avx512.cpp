// The AVX-512 level (x86-64-v4: AVX-512 F/BW/CD/DQ/VL on top of AVX2): 64-byte vectors, 16 floats.
#include "cpu/isa_prelude.h"

#if ATTNOPS_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,movbe,avx512f,avx512bw,avx512cd,avx512dq,avx512vl")
// GCC 12 flags the intentionally undefined registers of its own AVX-512 intrinsics (_mm512_undefined_*; as
// -Wuninitialized where _mm512_cvtph_ps is inlined into pack.h's transpose_block). The same sources compile with
// both warnings on in the other levels' units, so a real uninitialised read still shows there.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#define ATTNOPS_ISA avx512
#define ATTNOPS_VEC_BYTES 64
#define ATTNOPS_X86_SIMD 1
#include "cpu/kernels/all.h"
#pragma GCC pop_options

ATTNOPS_DEFINE_CPU_KERNELS(avx512)
#endif
