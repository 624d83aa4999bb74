#pragma once
// Direct calls of the easier_ext ops from Python for the common eager case, where autograd has
// nothing to record: plain tensors, no torch-function mode, no input that needs a gradient.
#include <pybind11/pybind11.h>

namespace easier_ext {

// Adds rectify_count_no_grad and rectify_count_no_grad_ to the extension module. Each takes the
// op's arguments and returns the op's result, or None when the call is not that common case (the
// caller then goes through torch.ops, whose Python autograd layer and overrides handle it).
void bind_no_grad_calls(pybind11::module_& m);

}  // namespace easier_ext
