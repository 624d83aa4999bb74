#pragma once
// The entropy proxy's derivative, one element at a time, for the CPU's scalar path and the CUDA
// kernel (the CPU's vector path writes the same steps with at::vec).
#include <c10/macros/Macros.h>

#include <cmath>

namespace easier_ext {

// |u| beyond which the proxy's derivative is exactly 0 (in float64 too); easier_ext/core/gradients.py
// clamps at the same value, so that +-inf gives (finite) * 0 = 0 rather than inf * 0 = NaN.
constexpr double kEntropyULimit = 1e4;

// u * p * (1 - p) / tau with u = x * inv_tau and p = sigmoid(u), computed as u * q * (1 - q) with
// q = sigmoid(-|u|) = e / (1 + e), e = exp(-|u|) <= 1 (the same value, with no 1 - p losing its
// digits as p nears 1, and no exp that can overflow), then times inv_tau: where inv_tau saturated
// (tiny tau), u * q * (1 - q) is 0 and so is the product. Times -1 / ln 2 it is dH/dx, H in bits.
// NaN gives NaN; +-inf gives 0.
// Always inlined: the CPU files that use it are compiled once per instruction set, and one shared
// out-of-line copy (of whichever set) must not be what they all call.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T entropy_proxy_slope(T x, T inv_tau) {
  T u = x * inv_tau;
  if (u != u) return u;  // NaN: the clamp below would turn it into a number
  const T limit = static_cast<T>(kEntropyULimit);
  u = u < -limit ? -limit : (u > limit ? limit : u);
  const T e = std::exp(-(u < T(0) ? -u : u));  // expf for float (::exp would compute in double)
  const T q = e / (T(1) + e);
  return u * q * (T(1) - q) * inv_tau;
}

}  // namespace easier_ext
