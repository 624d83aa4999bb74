// Schemas of the easier_ext ops, in one place. Each backend registers its kernels at the end of
// its own file (TORCH_LIBRARY_IMPL); fake (meta) kernels and autograd are registered from Python
// in easier_ext/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(easier_ext, m) {
  // Applies `activation` to `input` and, in the same pass, counts for every index along
  // `channel_dim` how many elements were ON (pre-activation > 0). Returns the activation's output
  // (same sizes and memory format as `input`) and the int64 counts, shape (C,). `alpha` is the
  // activation's scalar (leaky_relu's negative slope, elu's alpha), `weight` prelu's slopes.
  m.def(
      "rectify_count(Tensor input, str activation, float alpha, Tensor? weight, int channel_dim)"
      " -> (Tensor, Tensor)");
  // In-place form for inference (no autograd formula): writes the activation into `input` and
  // returns the counts. Saves allocating (and, for large tensors, page-faulting) a new output.
  m.def(
      "rectify_count_(Tensor(a!) input, str activation, float alpha, Tensor? weight, int channel_dim)"
      " -> Tensor");
  // rectify_count plus a differentiable proxy of each channel's ON/OFF entropy, in the same pass:
  // the third output holds, per channel, the sum over its elements of the binary entropy (bits) of
  // sigmoid(input / tau), float64 for a float64 input and float32 otherwise. `tau` > 0 is the
  // sigmoid's temperature. Its backward (registered from Python) also carries that sum's gradient.
  m.def(
      "rectify_count_entropy(Tensor input, str activation, float alpha, Tensor? weight, int channel_dim,"
      " float tau) -> (Tensor, Tensor, Tensor)");
  // rectify_count_entropy's backward for the sums, in one pass: adds to grad_input, in place, each
  // element's grad_sums[channel] * dH/dx (H the binary entropy in bits of sigmoid(input / tau)). What
  // its backward calls when no graph is recorded; no autograd formula (double backward uses torch ops).
  m.def(
      "entropy_proxy_grad_(Tensor(a!) grad_input, Tensor input, Tensor grad_sums, float tau, int channel_dim)"
      " -> ()");
}
