#include "rectify_args.h"

#include <ATen/ATen.h>

#include <array>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

namespace easier_ext {
namespace {

// The op's activation names; easier_ext/ops.py's ACTIVATIONS must list the same (a test checks).
constexpr std::array<std::pair<std::string_view, Activation>, 10> kActivations{{
    {"relu", Activation::ReLU},
    {"relu6", Activation::ReLU6},
    {"leaky_relu", Activation::LeakyReLU},
    {"prelu", Activation::PReLU},
    {"gelu", Activation::GELU},
    {"gelu_tanh", Activation::GELUTanh},
    {"silu", Activation::SiLU},
    {"hardswish", Activation::Hardswish},
    {"elu", Activation::ELU},
    {"mish", Activation::Mish},
}};

std::string known_activations() {
  std::string names;
  for (const auto& [name, a] : kActivations) {
    if (!names.empty()) names += ", ";
    names += name;
  }
  return names;
}

Activation parse_activation(std::string_view name) {
  for (const auto& [known, a] : kActivations) {
    if (name == known) return a;
  }
  TORCH_CHECK_VALUE(false, "easier_ext.rectify_count: unknown activation '", name, "'; expected one of ",
                    known_activations());
}

void check_input(const at::Tensor& input) {
  const auto dt = input.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                   "easier_ext.rectify_count: expected a floating-point input (float32, float64, float16 "
                   "or bfloat16), got ", dt);
  TORCH_CHECK_VALUE(input.dim() >= 1,
                    "easier_ext.rectify_count: expected an input with at least 1 dimension (a channel dim "
                    "to count over), got a 0-d tensor");
}

int64_t check_channel_dim(const at::Tensor& input, int64_t channel_dim) {
  const int64_t ndim = input.dim();
  TORCH_CHECK_INDEX(channel_dim >= -ndim && channel_dim < ndim, "easier_ext.rectify_count: channel_dim ",
                    channel_dim, " is out of range for a ", ndim, "-d input of shape ", input.sizes(),
                    " (expected a value in [", -ndim, ", ", ndim - 1, "])");
  return channel_dim < 0 ? channel_dim + ndim : channel_dim;
}

std::optional<at::Tensor> check_weight(Activation a, const at::Tensor& input,
                                       const std::optional<at::Tensor>& weight, int64_t channels) {
  if (a != Activation::PReLU) {
    TORCH_CHECK_VALUE(!weight.has_value(),
                      "easier_ext.rectify_count: a weight is only used by 'prelu'; got one for another "
                      "activation");
    return std::nullopt;
  }
  TORCH_CHECK_VALUE(weight.has_value(), "easier_ext.rectify_count: 'prelu' needs a weight tensor of 1 or ",
                    channels, " values");
  const at::Tensor& w = *weight;
  TORCH_CHECK_VALUE(w.dim() <= 1 && (w.numel() == 1 || w.numel() == channels),
                    "easier_ext.rectify_count: prelu weight of shape ", w.sizes(),
                    " does not match the input: expected 1 value or one per channel (", channels,
                    " along the channel dim)");
  TORCH_CHECK_TYPE(w.scalar_type() == input.scalar_type(), "easier_ext.rectify_count: prelu weight has dtype ",
                   w.scalar_type(), " but the input has ", input.scalar_type(), "; expected the same dtype");
  return w.contiguous();
}

// The entropy proxy's temperature divides the input: zero, negative or non-finite, it would make
// every sum NaN or meaningless rather than fail. easier_ext/core/ops.py gives the same message.
void check_tau(double tau) {
  TORCH_CHECK_VALUE(tau > 0 && std::isfinite(tau), "easier_ext.rectify_count_entropy: tau must be a positive, finite "
                    "temperature, got ", tau);
}

// For a non-overlapping, dense tensor, the dims laid out inside the channel dim (smaller
// strides) make the contiguous `inner` block; the others repeat it `outer` times.
ChannelLayout channel_layout(const at::Tensor& t, int64_t dim) {
  const int64_t channels = t.size(dim);
  if (channels <= 1 || t.numel() == 0) {
    return {1, channels, channels == 0 ? 0 : t.numel()};
  }
  int64_t inner = 1, outer = 1;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (d == dim || t.size(d) == 1) continue;
    (t.stride(d) < t.stride(dim) ? inner : outer) *= t.size(d);
  }
  TORCH_INTERNAL_ASSERT(t.stride(dim) == inner, "easier_ext: unexpected layout for a dense tensor");
  return {outer, channels, inner};
}

}  // namespace

void check_devices(const at::Tensor& input, const std::optional<at::Tensor>& weight) {
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK(weight->device() == input.device(), "easier_ext.rectify_count: expected weight on ", input.device(),
                " (the input's device), got ", weight->device());
  }
}

RectifyPlan plan_rectify(const at::Tensor& input, std::string_view activation, double alpha,
                         const std::optional<at::Tensor>& weight, int64_t channel_dim, bool in_place,
                         std::optional<double> tau) {
  check_devices(input, weight);
  const Activation a = parse_activation(activation);
  check_input(input);
  const int64_t dim = check_channel_dim(input, channel_dim);
  auto w = check_weight(a, input, weight, input.size(dim));
  if (tau) check_tau(*tau);

  // empty_like keeps a dense input's strides (contiguous, channels_last, permuted); a strided
  // view gets a dense layout, and is copied into it once so the kernels see plain blocks.
  const bool dense_input = input.is_non_overlapping_and_dense();
  at::Tensor output = in_place && dense_input ? input : at::empty_like(input);
  at::Tensor dense = input;
  if (!dense_input) {
    dense = at::empty_like(input);
    dense.copy_(input);
  }
  TORCH_INTERNAL_ASSERT(dense.strides() == output.strides());
  return {a, alpha, std::move(w), dense, output, channel_layout(dense, dim), tau};
}

void check_entropy_grad_devices(const at::Tensor& grad_input, const at::Tensor& input, const at::Tensor& grad_sums) {
  TORCH_CHECK(grad_input.device() == input.device() && grad_sums.device() == input.device(),
              "easier_ext.entropy_proxy_grad_: expected grad_input and grad_sums on ", input.device(),
              " (the input's device), got ", grad_input.device(), " and ", grad_sums.device());
}

EntropyGradPlan plan_entropy_grad(at::Tensor& grad_input, const at::Tensor& input, const at::Tensor& grad_sums,
                                  double tau, int64_t channel_dim) {
  constexpr const char* op = "easier_ext.entropy_proxy_grad_";
  check_entropy_grad_devices(grad_input, input, grad_sums);
  check_input(input);
  const int64_t dim = check_channel_dim(input, channel_dim);
  check_tau(tau);
  TORCH_CHECK_VALUE(grad_input.sizes() == input.sizes(), op, ": grad_input of shape ", grad_input.sizes(),
                    " does not match the input's ", input.sizes());
  TORCH_CHECK_TYPE(grad_input.scalar_type() == input.scalar_type(), op, ": grad_input has dtype ",
                   grad_input.scalar_type(), " but the input has ", input.scalar_type(), "; expected the same");
  const at::ScalarType sums_dtype = entropy_sums_dtype(input.scalar_type());
  const int64_t channels = input.size(dim);
  TORCH_CHECK_VALUE(grad_sums.dim() == 1 && grad_sums.size(0) == channels, op, ": grad_sums of shape ",
                    grad_sums.sizes(), " does not match the input: expected (", channels, ",), one per channel");
  TORCH_CHECK_TYPE(grad_sums.scalar_type() == sums_dtype, op, ": grad_sums has dtype ", grad_sums.scalar_type(),
                   "; expected ", sums_dtype, " (rectify_count_entropy's sums for a ", input.scalar_type(), " input)");
  const double inv_tau = sums_dtype == at::kDouble ? saturated_inverse<double>(tau) : saturated_inverse<float>(tau);
  std::vector<int64_t> shape(input.dim(), 1);
  shape[dim] = channels;
  const at::Tensor scale = grad_sums.mul(-1.0 / M_LN2).view(shape);
  // grad_input is read and written in place (TensorIterator allows an output that is exactly one of
  // its inputs, and refuses partial overlaps); scale broadcasts along every other dim. The iterator
  // borrows its operands: scale, made here, is handed over (owned) so that it outlives this call.
  at::TensorIterator iter = at::TensorIteratorConfig()
                                .check_all_same_dtype(false)
                                .resize_outputs(false)
                                .add_output(grad_input)
                                .add_const_input(grad_input)
                                .add_const_input(input)
                                .add_owned_const_input(scale)
                                .build();
  return {std::move(iter), inv_tau};
}

}  // namespace easier_ext
