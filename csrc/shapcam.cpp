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

TORCH_LIBRARY(shapcam, m) {
  m.def(
      "masked_prefixes(Tensor activations, Tensor baseline, Tensor perms, int perm_start, "
      "int perm_end, int prefix_start, int prefix_end) -> Tensor");
  m.def(
      "scatter_marginals_(Tensor values, Tensor perms, Tensor(a!) phi, Tensor(b!) phi_sq, "
      "int unit_size=1) -> ()");
  m.def(
      "linear_walk_(Tensor start_logits, Tensor deltas, Tensor perms, Tensor classes, bool "
      "softmax, Tensor(a!) phi, Tensor(b!) phi_sq, int unit_size=1) -> ()");
}
