// What the per-level kernel units include before they switch the target (cpu/isa.h says why):
// every torch and standard header that the kernels use, so that their inline functions and
// templates are compiled for the build's baseline, not for a level the CPU may lack.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/isa.h"
#include "ops.h"

#if ATTNOPS_MULTI_ISA
#include <immintrin.h>  // GCC declares every intrinsic; a function may use those of its own target
#endif
