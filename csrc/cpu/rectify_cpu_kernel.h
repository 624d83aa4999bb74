#pragma once
// The vectorized CPU kernels, compiled once per CPU capability (see CMakeLists.txt); each copy
// lives in its own namespace so the instruction sets never mix.
#include <cstdint>

#include "rectify_args.h"

namespace easier_ext::cpu {

// Writes plan.output and each channel's ON count into counts[0, C); for rectify_count_entropy's plan
// (plan.tau set), also each channel's sum of the entropy proxy, in bits, into entropy[0, C) (unused
// otherwise). One pass over plan.input; no temporary of the input's size.
using RectifyCountKernel = void (*)(const RectifyPlan& plan, int64_t* counts, double* entropy);

// Adds grad_sums[c] * dH/dx to grad_input over plan_entropy_grad's iterator (entropy_proxy_grad_).
using EntropyGradKernel = void (*)(at::TensorIteratorBase& iter, double inv_tau);

namespace DEFAULT {
void rectify_count_kernel(const RectifyPlan& plan, int64_t* counts, double* entropy);
void entropy_grad_kernel(at::TensorIteratorBase& iter, double inv_tau);
}  // namespace DEFAULT
namespace AVX2 {
void rectify_count_kernel(const RectifyPlan& plan, int64_t* counts, double* entropy);
void entropy_grad_kernel(at::TensorIteratorBase& iter, double inv_tau);
}  // namespace AVX2
namespace AVX512 {
void rectify_count_kernel(const RectifyPlan& plan, int64_t* counts, double* entropy);
void entropy_grad_kernel(at::TensorIteratorBase& iter, double inv_tau);
}  // namespace AVX512

}  // namespace easier_ext::cpu
