// The Python module rdr_fast._C. It exports nothing: loading the shared library runs
// the static TORCH_LIBRARY_IMPL registrations of the other files in csrc/, which
// attach the CPU kernels to the op schemas that rdr_fast/ops.py defines.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "rdr_fast C++ CPU kernels (registered with torch.library)", -1, nullptr};
  return PyModule_Create(&module_def);
}
