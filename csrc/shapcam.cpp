// Schemas of the shapcam ops. The kernels register per device in cpu/*_kernel.cpp and
// cuda/*_kernel.cu; fake kernels and autograd are registered from shapcam_ext/ops.py.
#include <torch/library.h>

#ifdef TORCH_EXTENSION_NAME  // set by torch's BuildExtension; the CMake build is a plain library
#include <Python.h>

extern "C" {
// `from shapcam_ext import _C` loads this library, whose static initialisers register the ops.
// The module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

// A round of sampling validates its permutations once, with permutation_ranks; the ops that read
// positions by step (masked_prefixes, scatter_marginals) take the ranks, the walks the
// permutations themselves, and only check the bounds of what they index with.
TORCH_LIBRARY(shapcam, m) {
  m.def("permutation_ranks(Tensor perms) -> Tensor");
  m.def(
      "masked_prefixes(Tensor activations, Tensor baseline, Tensor ranks, SymInt perm_start, "
      "SymInt perm_end, SymInt prefix_start, SymInt prefix_end) -> Tensor");
  m.def("scatter_marginals(Tensor values, Tensor ranks, ScalarType? dtype=None) -> Tensor");
  m.def(
      "scatter_marginals_(Tensor values, Tensor ranks, Tensor(a!) phi, Tensor(b!) phi_sq, "
      "SymInt unit_size=1) -> ()");
  m.def(
      "linear_walk(Tensor start_logits, Tensor deltas, Tensor perms, Tensor classes, bool softmax, "
      "ScalarType? dtype=None) -> Tensor");
  m.def(
      "linear_walk_(Tensor start_logits, Tensor deltas, Tensor perms, Tensor classes, bool "
      "softmax, Tensor(a!) phi, Tensor(b!) phi_sq, SymInt unit_size=1) -> ()");
  m.def(
      "linear_walk_backward(Tensor grad_phi, Tensor start_logits, Tensor deltas, Tensor perms, "
      "Tensor classes, bool softmax, bool[2] output_mask) -> (Tensor, Tensor)");
}
