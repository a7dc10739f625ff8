// Every CPU kernel, for one ISA level's unit (csrc/cpu/isa_<level>.cpp; see cpu/isa.h). Each
// operator's kernel is the *_cpu function at the end of its file; the unit lists them in its table.
#pragma once

#include "cpu/kernels/block_sparse_attention.cpp"
#include "cpu/kernels/decode_attention.cpp"
#include "cpu/kernels/lowrank_attention.cpp"
#include "cpu/kernels/moba_route.cpp"
