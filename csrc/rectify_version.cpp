// ADInplaceOrView kernel of easier_ext::rectify_count_: bumps the input's version counter, as
// torch's own in-place ops do, so autograd notices when a tensor it saved is overwritten. Every
// call passes here (torch.ops, the no-grad calls, compiled code) except in inference mode, which
// skips this key as it does for torch's ops.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <optional>

namespace easier_ext {
namespace {

at::Tensor rectify_count_inplace_version(c10::DispatchKeySet keys, at::Tensor& input, c10::string_view activation,
                                         double alpha, const std::optional<at::Tensor>& weight,
                                         int64_t channel_dim) {
  // Before the write: an inference tensor outside inference mode is refused here, untouched.
  torch::autograd::impl::bump_version(input);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("easier_ext::rectify_count_", "")
                             .typed<at::Tensor(at::Tensor&, c10::string_view, double,
                                               const std::optional<at::Tensor>&, int64_t)>();
  at::AutoDispatchBelowADInplaceOrView below;
  return op.redispatch(keys & c10::after_ADInplaceOrView_keyset, input, activation, alpha, weight,
                       channel_dim);
}

}  // namespace

TORCH_LIBRARY_IMPL(easier_ext, ADInplaceOrView, m) {
  m.impl("rectify_count_", TORCH_FN(rectify_count_inplace_version));
}

}  // namespace easier_ext
