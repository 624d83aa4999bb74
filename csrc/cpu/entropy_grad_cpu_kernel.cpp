// The entropy proxy's gradient on the CPU (entropy_proxy_grad_): one pass over grad_input and the
// input, at::vec vectors for float and double, ATen's TensorIterator for any layout and threads.
// Compiled once per CPU capability, as the forward kernel.
#include "cpu/rectify_cpu_kernel.h"

#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/cpu/Loops.h>

#include "entropy_proxy_math.h"

namespace easier_ext::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// entropy_proxy_slope, a vector at a time (the same steps).
template <typename T>
Vectorized<T> entropy_proxy_slope_vec(const Vectorized<T>& x, const Vectorized<T>& inv_tau) {
  const Vectorized<T> one(T(1));
  const Vectorized<T> limit(static_cast<T>(kEntropyULimit));
  const auto u = x * inv_tau;
  // at::vec's clamp keeps NaN on some capabilities and not on others: put it back explicitly
  const auto clamped = Vectorized<T>::blendv(at::vec::clamp(u, -limit, limit), u, u.isnan());
  const auto e = clamped.abs().neg().exp();
  const auto q = e / (one + e);
  return clamped * q * (one - q) * inv_tau;
}

}  // namespace

void entropy_grad_kernel(at::TensorIteratorBase& iter, double inv_tau) {
  const at::ScalarType dtype = iter.input_dtype(1);
  if (dtype == at::kHalf || dtype == at::kBFloat16) {  // float scales: the sum in float, rounded once
    AT_DISPATCH_REDUCED_FLOATING_TYPES(dtype, "entropy_proxy_grad_cpu", [&] {
      const float it = static_cast<float>(inv_tau);
      at::native::cpu_kernel(iter, [it](scalar_t g, scalar_t x, float s) -> scalar_t {
        return static_cast<scalar_t>(static_cast<float>(g) + s * entropy_proxy_slope(static_cast<float>(x), it));
      });
    });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(dtype, "entropy_proxy_grad_cpu", [&] {
    const scalar_t it = static_cast<scalar_t>(inv_tau);
    const Vectorized<scalar_t> vit(it);
    at::native::cpu_kernel_vec(
        iter, [it](scalar_t g, scalar_t x, scalar_t s) { return g + s * entropy_proxy_slope(x, it); },
        [vit](Vectorized<scalar_t> g, Vectorized<scalar_t> x, Vectorized<scalar_t> s) {
          return at::vec::fmadd(s, entropy_proxy_slope_vec(x, vit), g);
        });
  });
}

}  // namespace easier_ext::cpu::CPU_CAPABILITY
