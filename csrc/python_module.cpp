// Entry point of the Python extension pareto_lora._C (not part of the CMake library for C++ users).
#include <Python.h>

extern "C" {
// Importing pareto_lora._C loads this shared object, which runs the operator registrations
// (TORCH_LIBRARY / TORCH_LIBRARY_IMPL); the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
