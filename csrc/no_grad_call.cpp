// Why: calling an op through torch.ops runs several Python frames (OpOverload, torch.library's
// autograd layer) before the kernel. After a large kernel has evicted them from the caches they
// cost ~100 us, 10% of a (64, 64, 32, 32) ReLU; torch's own F.relu reaches its kernel from C++.
// These calls do what that layer does when no gradient is needed (dispatch below autograd) from
// C++. Dispatch modes (FakeTensorMode and the like) still see the call: only autograd is skipped.
#include "no_grad_call.h"

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>

namespace py = pybind11;

namespace easier_ext {
namespace {

using RectifyCount = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, c10::string_view, double,
                                                         const std::optional<at::Tensor>&, int64_t);
using RectifyCountInplace = at::Tensor(at::Tensor&, c10::string_view, double, const std::optional<at::Tensor>&,
                                       int64_t);

// The tensor arguments of a call that may skip torch.ops, or nothing if it may not: a tensor
// subclass or a torch-function mode could override the op, and an input needing a gradient
// needs the autograd layer.
std::optional<std::pair<at::Tensor, std::optional<at::Tensor>>> plain_no_grad_args(py::handle input,
                                                                                   py::handle weight) {
  if (!THPVariable_CheckExact(input.ptr())) return std::nullopt;
  if (!weight.is_none() && !THPVariable_CheckExact(weight.ptr())) return std::nullopt;
  if (at::impl::torch_function_mode_enabled()) return std::nullopt;
  at::Tensor x = THPVariable_Unpack(input.ptr());
  std::optional<at::Tensor> w;
  if (!weight.is_none()) w = THPVariable_Unpack(weight.ptr());
  if (c10::GradMode::is_enabled() && (x.requires_grad() || (w && w->requires_grad()))) return std::nullopt;
  return std::make_pair(std::move(x), std::move(w));
}

// The op called as torch.library's autograd layer calls it when no gradient is needed: below
// autograd, with the GIL released as torch's own bindings do around a kernel.
template <typename Signature, typename... Args>
auto call_below_autograd(const c10::TypedOperatorHandle<Signature>& op, Args&&... args) {
  py::gil_scoped_release no_gil;
  at::AutoDispatchBelowAutograd below_autograd;
  return op.call(std::forward<Args>(args)...);
}

py::object rectify_count_no_grad(py::handle input, const std::string& activation, double alpha,
                                 py::handle weight, int64_t channel_dim) {
  HANDLE_TH_ERRORS
  auto args = plain_no_grad_args(input, weight);
  if (!args) return py::none();
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("easier_ext::rectify_count", "")
                             .typed<RectifyCount>();
  const auto result = call_below_autograd(op, args->first, activation, alpha, args->second, channel_dim);
  return py::make_tuple(py::reinterpret_steal<py::object>(THPVariable_Wrap(std::get<0>(result))),
                        py::reinterpret_steal<py::object>(THPVariable_Wrap(std::get<1>(result))));
  END_HANDLE_TH_ERRORS_PYBIND
}

py::object rectify_count_no_grad_(py::handle input, const std::string& activation, double alpha,
                                  py::handle weight, int64_t channel_dim) {
  HANDLE_TH_ERRORS
  auto args = plain_no_grad_args(input, weight);
  if (!args) return py::none();
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("easier_ext::rectify_count_", "")
                             .typed<RectifyCountInplace>();
  at::Tensor counts = call_below_autograd(op, args->first, activation, alpha, args->second, channel_dim);
  return py::reinterpret_steal<py::object>(THPVariable_Wrap(counts));
  END_HANDLE_TH_ERRORS_PYBIND
}

}  // namespace

void bind_no_grad_calls(py::module_& m) {
  m.def("rectify_count_no_grad", &rectify_count_no_grad, py::arg("input"), py::arg("activation"),
        py::arg("alpha"), py::arg("weight"), py::arg("channel_dim"),
        "easier_ext::rectify_count without the autograd layer, or None when the call needs it.");
  m.def("rectify_count_no_grad_", &rectify_count_no_grad_, py::arg("input"), py::arg("activation"),
        py::arg("alpha"), py::arg("weight"), py::arg("channel_dim"),
        "easier_ext::rectify_count_ without the autograd layer, or None when the call needs it.");
}

}  // namespace easier_ext
