// The Python module fused_opt._C, on CPython's limited API (abi3) and torch's stable ABI: one
// binary for every Python from 3.10 and every torch from the target version on. Loading it
// registers the CPU kernels with the dispatcher (ops.cpp). Its functions report and choose the
// SIMD variant and expose two passes for the tests and the benchmark; the capsule
// `_active_kernels` hands the kernel choice to the optional accelerator fused_opt._C_direct,
// so that both run the variant chosen here.
#include <Python.h>

#include <cstdint>
#include <cstdlib>
#include <exception>

#include "isa.h"

namespace fused_opt_cpu {
void run_stream_pass_stable(float* const* arrays, int streams, int64_t n);  // ops.cpp
}

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
    requested = PyUnicode_AsUTF8AndSize(arg, nullptr);
    if (requested == nullptr) return nullptr;
  }
  if (const char* message = select_isa(requested)) {
    if (PyErr_WarnEx(PyExc_RuntimeWarning, message, 1) != 0) return nullptr;
  }
  return isa_active(nullptr, nullptr);
}

// divide_by_constant_at(x, out, n, c): out = x / c over n floats at addresses x and out, the way
// the active variant's 16-bit Adam kernels divide (fused_opt._ops.divide_by_constant checks the
// tensors; for tests/test_cpu_kernels.py).
PyObject* divide_by_constant_at(PyObject*, PyObject* args) {
  PyObject *x, *out;
  Py_ssize_t n;
  float c;
  if (!PyArg_ParseTuple(args, "OOnf:divide_by_constant_at", &x, &out, &n, &c)) return nullptr;
  const void* from = PyLong_AsVoidPtr(x);
  void* to = PyLong_AsVoidPtr(out);
  if (PyErr_Occurred()) return nullptr;
  active_kernels().divide_by_constant(static_cast<const float*>(from), static_cast<float*>(to), n,
                                      c);
  Py_RETURN_NONE;
}

// stream_pass_at(addresses, n): the bandwidth floor's pass over 1 to kMaxPassStreams arrays of n
// floats (fused_opt._ops.stream_pass checks the tensors), threaded like a step.
PyObject* stream_pass_at(PyObject*, PyObject* args) {
  PyObject* addresses;
  Py_ssize_t n;
  if (!PyArg_ParseTuple(args, "O!n:stream_pass_at", &PyList_Type, &addresses, &n)) return nullptr;
  const Py_ssize_t streams = PyList_Size(addresses);
  if (streams < 1 || streams > kMaxPassStreams) {
    PyErr_Format(PyExc_ValueError, "stream_pass_at: 1 to %d arrays, got %zd", kMaxPassStreams,
                 streams);
    return nullptr;
  }
  float* arrays[kMaxPassStreams];
  for (Py_ssize_t s = 0; s < streams; ++s) {
    arrays[s] = static_cast<float*>(PyLong_AsVoidPtr(PyList_GetItem(addresses, s)));
    if (PyErr_Occurred()) return nullptr;
  }
  std::exception_ptr error;
  Py_BEGIN_ALLOW_THREADS
  try {
    run_stream_pass_stable(arrays, static_cast<int>(streams), n);
  } catch (...) {
    error = std::current_exception();
  }
  Py_END_ALLOW_THREADS
  if (error) {
    try {
      std::rethrow_exception(error);
    } catch (const std::exception& e) {
      PyErr_Format(PyExc_RuntimeError, "stream_pass: %s", e.what());
    }
    return nullptr;
  }
  Py_RETURN_NONE;
}

const KernelTable* active_kernel_table() { return &active_kernels(); }

PyMethodDef kMethods[] = {
    {"isa_compiled", isa_compiled, METH_NOARGS, "SIMD variants of the CPU kernels in this build."},
    {"isa_supported", isa_supported, METH_NOARGS, "Compiled variants this CPU can run."},
    {"isa_active", isa_active, METH_NOARGS, "The variant the CPU kernels use now."},
    {"set_isa", set_isa, METH_O,
     "Use the named variant (None: the best supported); returns the active one."},
    {"divide_by_constant_at", divide_by_constant_at, METH_VARARGS,
     "divide_by_constant_at(x, out, n, c): out = x / c as the 16-bit Adam kernels divide."},
    {"stream_pass_at", stream_pass_at, METH_VARARGS,
     "stream_pass_at(addresses, n): reads every array and writes back all but the second, "
     "unchanged, as the step's kernels stream memory: the pass bench/ times as the floor."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C",
                       "fused_opt CPU kernels (registered as fused_opt::sgd_ / adam_ on CPU).", -1,
                       kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&kModule);
  if (module == nullptr) return nullptr;
  // FUSED_OPT_CPU_ISA=baseline|avx2|avx512 forces a variant (tests, comparisons). A value this
  // CPU cannot run is reported by fused_opt._ops as a warning after the import (isa_request_note):
  // a warning raised here would fail the import under -W error and lose the kernels.
  const char* message = select_isa(std::getenv("FUSED_OPT_CPU_ISA"));
  PyObject* note = message != nullptr ? PyUnicode_FromString(message) : Py_NewRef(Py_None);
  PyObject* kernels = PyCapsule_New(reinterpret_cast<void*>(&active_kernel_table),
                                    "fused_opt._C._active_kernels", nullptr);
  const bool ok = note != nullptr && kernels != nullptr &&
                  PyModule_AddObjectRef(module, "isa_request_note", note) == 0 &&
                  PyModule_AddObjectRef(module, "_active_kernels", kernels) == 0;
  Py_XDECREF(note);
  Py_XDECREF(kernels);
  if (!ok) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
