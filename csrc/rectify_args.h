#pragma once
// Turns the arguments of easier_ext::rectify_count into what a backend kernel needs, with the
// checks shared by every backend. Nothing here touches the data, so a bad call fails before any
// output or count is written.
#include <ATen/TensorIterator.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <string_view>

namespace easier_ext {

enum class Activation { ReLU, ReLU6, LeakyReLU, PReLU, GELU, GELUTanh, SiLU, Hardswish, ELU, Mish };

// The activations whose formula takes a scalar per channel: the op's `alpha` (leaky_relu's
// negative slope, elu's alpha) or prelu's weight.
constexpr bool has_slope(Activation a) {
  return a == Activation::LeakyReLU || a == Activation::PReLU || a == Activation::ELU;
}

// The dense input seen as `outer` blocks of `channels` blocks of `inner` contiguous elements.
// inner == 1 is a channels-last / Linear-shaped tensor; inner > 1 is NCHW-like.
struct ChannelLayout {
  int64_t outer;
  int64_t channels;
  int64_t inner;
};

struct RectifyPlan {
  Activation activation;
  double alpha;                        // leaky_relu's negative slope, elu's alpha; unused otherwise
  std::optional<at::Tensor> weight;    // prelu only: contiguous, 1 or `channels` values
  at::Tensor input;                    // non-overlapping and dense (a copy if the caller's was not)
  at::Tensor output;                   // same sizes and strides as `input`
  ChannelLayout layout;
  std::optional<double> tau;           // rectify_count_entropy's temperature (> 0, finite); none otherwise
};

// The dtype of rectify_count_entropy's sums: float64 for a float64 input, else float32 (what the
// kernels accumulate float32, float16 and bfloat16 inputs in).
inline at::ScalarType entropy_sums_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// 1 / tau in T, saturated at T's largest finite value (a tau below T's range must not make
// 0 * (1 / tau) NaN).
template <typename T>
T saturated_inverse(double tau) {
  return static_cast<T>(std::min(1.0 / tau, static_cast<double>(std::numeric_limits<T>::max())));
}

// saturated_inverse of the plan's tau in the kernels' accumulation type T; 0, unused, for a plan
// without tau.
template <typename T>
T inverse_tau(const RectifyPlan& plan) {
  return plan.tau ? saturated_inverse<T>(*plan.tau) : T(0);
}

// Every tensor argument must be on the input's device. Kernels call this before anything else: the
// dispatcher picks the kernel from all tensor arguments (a CUDA weight with a CPU input reaches the
// CUDA kernel), so the input's device is not yet known to be the kernel's.
void check_devices(const at::Tensor& input, const std::optional<at::Tensor>& weight);

// With `in_place`, a dense input is also the output (the kernels read each element before writing
// it); a non-dense one still gets a dense output, which the caller copies back. With `tau`, the
// plan is rectify_count_entropy's, and tau is checked with the other arguments, before anything
// is allocated.
RectifyPlan plan_rectify(const at::Tensor& input, std::string_view activation, double alpha,
                         const std::optional<at::Tensor>& weight, int64_t channel_dim, bool in_place = false,
                         std::optional<double> tau = std::nullopt);

// What the kernels of entropy_proxy_grad_ need: an iterator over (grad_input out, grad_input,
// input, scale), scale being each channel's grad_sums[c] * (-1 / ln 2) in the sums' dtype, viewed
// to broadcast along the input's channel dim; and 1 / tau saturated (saturated_inverse) in the sums' dtype (kept out
// of the scale, where a saturated 1 / tau would make it infinite and 0 * inf NaN).
struct EntropyGradPlan {
  at::TensorIterator iter;
  double inv_tau;
};

// entropy_proxy_grad_'s tensors must all be on the input's device (what check_devices is to
// rectify_count's): kernels call this first, for the same reason.
void check_entropy_grad_devices(const at::Tensor& grad_input, const at::Tensor& input, const at::Tensor& grad_sums);

// Checks entropy_proxy_grad_'s arguments (shapes, dtypes, devices, tau, channel_dim) before
// anything is written.
EntropyGradPlan plan_entropy_grad(at::Tensor& grad_input, const at::Tensor& input, const at::Tensor& grad_sums,
                                  double tau, int64_t channel_dim);

// Calls `f(std::integral_constant<Activation, A>{})` with the activation as a compile-time value.
template <typename F>
decltype(auto) dispatch_activation(Activation a, F&& f) {
  using A = Activation;
  switch (a) {
    case A::ReLU: return f(std::integral_constant<A, A::ReLU>{});
    case A::ReLU6: return f(std::integral_constant<A, A::ReLU6>{});
    case A::LeakyReLU: return f(std::integral_constant<A, A::LeakyReLU>{});
    case A::PReLU: return f(std::integral_constant<A, A::PReLU>{});
    case A::GELU: return f(std::integral_constant<A, A::GELU>{});
    case A::GELUTanh: return f(std::integral_constant<A, A::GELUTanh>{});
    case A::SiLU: return f(std::integral_constant<A, A::SiLU>{});
    case A::Hardswish: return f(std::integral_constant<A, A::Hardswish>{});
    case A::ELU: return f(std::integral_constant<A, A::ELU>{});
    case A::Mish: return f(std::integral_constant<A, A::Mish>{});
  }
  TORCH_CHECK(false, "easier_ext: unhandled activation");
}

}  // namespace easier_ext
