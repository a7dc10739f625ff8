// The generic level: the kernels for the build's baseline target (SSE2 on x86-64, NEON on aarch64),
// 16-byte vectors. Always built; the only level off x86-64.
#include "cpu/isa_prelude.h"

#define ATTNOPS_ISA generic
#define ATTNOPS_VEC_BYTES 16
#define ATTNOPS_X86_SIMD 0
#include "cpu/kernels/all.h"

ATTNOPS_DEFINE_CPU_KERNELS(generic)
