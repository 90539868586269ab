// Entry point of the Python extension pareto_lora._C (not part of the CMake library for C++ users).
#include <Python.h>

#include <vector>

#include "cpu/segment_kernels.h"

namespace {
// pareto_lora._C.intra_op_threads(): a build check for tests (is the CPU code really parallel?).
PyObject* intra_op_threads(PyObject*, PyObject*) {
  return PyLong_FromLongLong(static_cast<long long>(pareto_lora::intra_op_threads_used()));
}

// pareto_lora._C.cpu_capability(): the CPU build the op uses now ("base", "avx2", "avx512").
PyObject* cpu_capability(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(pareto_lora::cpu_capability_name());
  } catch (const c10::Error& e) {  // a bad PARETO_LORA_CPU_CAPABILITY: its message, not a C++ backtrace
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

// pareto_lora._C.cpu_capabilities(): the builds this CPU runs, portable first.
PyObject* cpu_capabilities(PyObject*, PyObject*) {
  const std::vector<const char*> names = pareto_lora::cpu_capabilities();
  PyObject* out = PyTuple_New(static_cast<Py_ssize_t>(names.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < names.size(); ++i) {
    PyObject* name = PyUnicode_FromString(names[i]);
    if (name == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyTuple_SET_ITEM(out, static_cast<Py_ssize_t>(i), name);
  }
  return out;
}

PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The CPU build of the kernels the op uses now: 'base', 'avx2' or 'avx512' (PARETO_LORA_CPU_CAPABILITY)."},
    {"cpu_capabilities", cpu_capabilities, METH_NOARGS,
     "The CPU builds this CPU runs, portable first: a subset of ('base', 'avx2', 'avx512')."},
    {"intra_op_threads", intra_op_threads, METH_NOARGS,
     "Distinct threads one at::parallel_for over torch.get_num_threads() items ran on."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" {
// Importing pareto_lora._C loads this shared object, which runs the operator registrations
// (TORCH_LIBRARY / TORCH_LIBRARY_IMPL).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}
