// The Python module fused_opt._C: loading it registers the CPU kernels (ops.cpp) with the
// dispatcher; its functions report and choose the SIMD variant. Plain CPython API, no pybind11.
#include <Python.h>

#include <cstdlib>

#include "isa.h"

namespace {

using namespace fused_opt_cpu;

PyObject* names_where(bool (*keep)(int)) {
  PyObject* list = PyList_New(0);
  if (list == nullptr) return nullptr;
  for (int i = 0; i < compiled_isa_count(); ++i) {
    if (!keep(i)) continue;
    PyObject* name = PyUnicode_FromString(compiled_isa_name(i));
    if (name == nullptr || PyList_Append(list, name) != 0) {
      Py_XDECREF(name);
      Py_DECREF(list);
      return nullptr;
    }
    Py_DECREF(name);
  }
  return list;
}

PyObject* isa_compiled(PyObject*, PyObject*) {
  return names_where([](int) { return true; });
}

PyObject* isa_supported(PyObject*, PyObject*) {
  return names_where([](int i) { return isa_runs_here(i); });
}

PyObject* isa_active(PyObject*, PyObject*) { return PyUnicode_FromString(active_kernels().name); }

// Choose a variant by name ("" or None: the best one); returns the active name. Asking for one
// this CPU cannot run warns (RuntimeWarning) and picks the best supported one.
PyObject* set_isa(PyObject*, PyObject* arg) {
  const char* requested = nullptr;
  if (arg != Py_None) {
    requested = PyUnicode_AsUTF8(arg);
    if (requested == nullptr) return nullptr;
  }
  if (const char* message = select_isa(requested)) {
    if (PyErr_WarnEx(PyExc_RuntimeWarning, message, 1) != 0) return nullptr;
  }
  return isa_active(nullptr, nullptr);
}

PyMethodDef kMethods[] = {
    {"isa_compiled", isa_compiled, METH_NOARGS, "SIMD variants of the CPU kernels in this build."},
    {"isa_supported", isa_supported, METH_NOARGS, "Compiled variants this CPU can run."},
    {"isa_active", isa_active, METH_NOARGS, "The variant the CPU kernels use now."},
    {"set_isa", set_isa, METH_O,
     "Use the named variant (None: the best supported); returns the active one."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C",
                       "fused_opt CPU kernels (registered as fused_opt::sgd_ / adam_ on CPU).", -1,
                       kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&kModule);
  if (module == nullptr) return nullptr;
  // FUSED_OPT_CPU_ISA=baseline|avx2|avx512 forces a variant (tests, comparisons).
  if (const char* message = select_isa(std::getenv("FUSED_OPT_CPU_ISA"))) {
    if (PyErr_WarnEx(PyExc_RuntimeWarning, message, 1) != 0) {
      Py_DECREF(module);
      return nullptr;
    }
  }
  return module;
}
