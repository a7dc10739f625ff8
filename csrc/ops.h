// Shared by every kernel translation unit: the debug switch that NaN-fills outputs at allocation.
#pragma once

#include <ATen/ATen.h>

namespace attnops {

// When on (tests turn it on), kernels fill every output with NaN right after allocating it, so an
// element a kernel forgets to write fails the comparison with the reference.
bool poison_outputs();

// Which backward algorithm the CPU attention kernels use: 0 chooses by problem size, 1 forces the
// fused single pass, 2 the two-pass one (tests run both).
int backward_mode();

inline at::Tensor maybe_poison(at::Tensor t) {
  if (poison_outputs() && at::isFloatingType(t.scalar_type())) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

}  // namespace attnops
