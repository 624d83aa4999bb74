// The entropy proxy's gradient on CUDA (entropy_proxy_grad_): one elementwise pass over grad_input
// and the input through ATen's TensorIterator (any layout, vectorized loads where contiguous), on
// the current stream, with no host synchronisation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/native/cuda/Loops.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "entropy_proxy_math.h"
#include "rectify_args.h"

namespace easier_ext {
namespace {

void entropy_proxy_grad_cuda(at::Tensor& grad_input, const at::Tensor& input, const at::Tensor& grad_sums, double tau,
                             int64_t channel_dim) {
  check_entropy_grad_devices(grad_input, input, grad_sums);
  TORCH_INTERNAL_ASSERT(input.device().is_cuda());  // after the check: a CPU input may reach this kernel
  const c10::cuda::CUDAGuard device_guard(input.device());  // before the plan, which computes the scales
  EntropyGradPlan plan = plan_entropy_grad(grad_input, input, grad_sums, tau, channel_dim);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "entropy_proxy_grad_cuda", [&] {
    using opmath = at::opmath_type<scalar_t>;
    const opmath inv_tau = static_cast<opmath>(plan.inv_tau);
    // the scales are opmath (the sums' dtype): float for float16/bfloat16, which add in float
    at::native::gpu_kernel(plan.iter, [inv_tau] GPU_LAMBDA(scalar_t g, scalar_t x, opmath s) -> scalar_t {
      return static_cast<scalar_t>(static_cast<opmath>(g) + s * entropy_proxy_slope(static_cast<opmath>(x), inv_tau));
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(easier_ext, CUDA, m) {
  m.impl("entropy_proxy_grad_", &entropy_proxy_grad_cuda);
}

}  // namespace easier_ext
