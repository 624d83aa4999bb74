// CPU backend of the easier_ext ops: picks the kernel variant for this CPU and registers it.
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include "build_info.h"
#include "cpu/rectify_cpu_kernel.h"
#include "rectify_args.h"

namespace easier_ext {
namespace {

#ifdef EASIER_EXT_CPU_X86
// The variant for this CPU of a kernel compiled once per capability: ATen's choice, which checks
// the CPU and honours ATEN_CPU_CAPABILITY.
template <typename Kernel>
Kernel for_this_cpu(Kernel avx512, Kernel avx2, Kernel fallback) {
  const std::string cap = at::get_cpu_capability();
  if (cap.rfind("AVX512", 0) == 0) return avx512;
  if (cap.rfind("AVX2", 0) == 0) return avx2;
  return fallback;
}
#define EASIER_EXT_FOR_THIS_CPU(kernel) for_this_cpu(cpu::AVX512::kernel, cpu::AVX2::kernel, cpu::DEFAULT::kernel)
#else  // only the DEFAULT variant is built
#define EASIER_EXT_FOR_THIS_CPU(kernel) cpu::DEFAULT::kernel
#endif

cpu::RectifyCountKernel select_kernel() { return EASIER_EXT_FOR_THIS_CPU(rectify_count_kernel); }

cpu::EntropyGradKernel select_entropy_grad_kernel() { return EASIER_EXT_FOR_THIS_CPU(entropy_grad_kernel); }

std::tuple<at::Tensor, at::Tensor> rectify_count_cpu(const at::Tensor& input, c10::string_view activation,
                                                      double alpha, const std::optional<at::Tensor>& weight,
                                                      int64_t channel_dim) {
  check_devices(input, weight);
  TORCH_INTERNAL_ASSERT(input.device().is_cpu());
  RectifyPlan plan = plan_rectify(input, std::string_view(activation.data(), activation.size()), alpha,
                                  weight, channel_dim);
  at::Tensor counts = at::empty({plan.layout.channels}, input.options().dtype(at::kLong));
  static const cpu::RectifyCountKernel kernel = select_kernel();
  kernel(plan, counts.mutable_data_ptr<int64_t>(), nullptr);
  return {plan.output, counts};
}

at::Tensor rectify_count_inplace_cpu(at::Tensor& input, c10::string_view activation, double alpha,
                                     const std::optional<at::Tensor>& weight, int64_t channel_dim) {
  check_devices(input, weight);
  TORCH_INTERNAL_ASSERT(input.device().is_cpu());
  RectifyPlan plan = plan_rectify(input, std::string_view(activation.data(), activation.size()), alpha,
                                  weight, channel_dim, /*in_place=*/true);
  at::Tensor counts = at::empty({plan.layout.channels}, input.options().dtype(at::kLong));
  static const cpu::RectifyCountKernel kernel = select_kernel();
  kernel(plan, counts.mutable_data_ptr<int64_t>(), nullptr);
  if (!plan.output.is_same(input)) input.copy_(plan.output);
  return counts;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rectify_count_entropy_cpu(const at::Tensor& input,
                                                                         c10::string_view activation, double alpha,
                                                                         const std::optional<at::Tensor>& weight,
                                                                         int64_t channel_dim, double tau) {
  check_devices(input, weight);
  TORCH_INTERNAL_ASSERT(input.device().is_cpu());
  RectifyPlan plan = plan_rectify(input, std::string_view(activation.data(), activation.size()), alpha,
                                  weight, channel_dim, /*in_place=*/false, tau);
  at::Tensor counts = at::empty({plan.layout.channels}, input.options().dtype(at::kLong));
  // The kernel merges its per-thread sums in double; the result is rounded once to the sums' dtype.
  at::Tensor sums = at::empty({plan.layout.channels}, input.options().dtype(at::kDouble));
  static const cpu::RectifyCountKernel kernel = select_kernel();
  kernel(plan, counts.mutable_data_ptr<int64_t>(), sums.mutable_data_ptr<double>());
  return {plan.output, counts, sums.to(entropy_sums_dtype(input.scalar_type()))};
}

void entropy_proxy_grad_cpu(at::Tensor& grad_input, const at::Tensor& input, const at::Tensor& grad_sums, double tau,
                            int64_t channel_dim) {
  check_entropy_grad_devices(grad_input, input, grad_sums);
  TORCH_INTERNAL_ASSERT(input.device().is_cpu());
  EntropyGradPlan plan = plan_entropy_grad(grad_input, input, grad_sums, tau, channel_dim);
  static const cpu::EntropyGradKernel kernel = select_entropy_grad_kernel();
  kernel(plan.iter, plan.inv_tau);
}

}  // namespace

std::string cpu_kernel_capability() {
  const auto k = select_kernel();
#ifdef EASIER_EXT_CPU_X86
  if (k == cpu::AVX512::rectify_count_kernel) return "AVX512";
  if (k == cpu::AVX2::rectify_count_kernel) return "AVX2";
#endif
  (void)k;
  return "DEFAULT";
}

TORCH_LIBRARY_IMPL(easier_ext, CPU, m) {
  m.impl("rectify_count", &rectify_count_cpu);
  m.impl("rectify_count_", &rectify_count_inplace_cpu);
  m.impl("rectify_count_entropy", &rectify_count_entropy_cpu);
  m.impl("entropy_proxy_grad_", &entropy_proxy_grad_cpu);
}

}  // namespace easier_ext
