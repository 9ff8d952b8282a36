// The Python module fused_opt._C_direct: the optional accelerator of the CPU kernels. Built
// against one torch and one Python (torch's C++ API, full CPython API), it is loaded only where
// both match (fused_opt/_ops.py); fused_opt._C, on the stable ABI, works everywhere without it.
//
// sgd_() / adam_() are direct entry points to the same step as the dispatcher's kernels, for
// eager code: they take the op's arguments positionally and read the tensors straight from the
// Python lists, skipping the dispatcher's per-tensor boxing (most of the cost of a call with
// thousands of small tensors). grads_of(), same_items() and observed() save the optimizers'
// Python code the same per-tensor costs. Plain CPython API, no pybind11.
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/record_function.h>
#include <Python.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/profiler/orchestration/observer.h>

#include <cstdlib>
#include <exception>
#include <vector>

#include "../cpu/step_impl.h"
#include "aten_tensor.h"

namespace fused_opt_cpu {
const KernelTable* (*direct_active_kernels)() = nullptr;
}

namespace {

using namespace fused_opt_cpu;
using Tensor = at::Tensor;
using SgdCall = fused_opt_cpu::SgdCall<Tensor>;
using AdamCall = fused_opt_cpu::AdamCall<Tensor>;
using TensorRefs = fused_opt_cpu::TensorRefs<Tensor>;

// ---- direct entry points ---------------------------------------------------------------------
// Each parser returns false with a Python exception set.
struct PyTensorList {
  std::vector<const at::Tensor*> storage;
  bool parse(PyObject* obj, const char* name, TensorRefs& out) {
    if (!PyList_Check(obj) && !PyTuple_Check(obj)) {
      PyErr_Format(PyExc_TypeError, "fused_opt._C: %s must be a list of tensors", name);
      return false;
    }
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
    PyObject** items = PySequence_Fast_ITEMS(obj);
    storage.clear();
    storage.reserve(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (!THPVariable_Check(items[i])) {
        PyErr_Format(PyExc_TypeError, "fused_opt._C: %s[%zd] is not a tensor", name, i);
        return false;
      }
      storage.push_back(&THPVariable_Unpack(items[i]));
    }
    out = {storage.data(), storage.size()};
    return true;
  }
};

bool parse_double(PyObject* obj, double& out) {
  out = PyFloat_AsDouble(obj);
  return !(out == -1.0 && PyErr_Occurred());
}

bool parse_bool(PyObject* obj, bool& out) {
  const int truth = PyObject_IsTrue(obj);
  out = truth == 1;
  return truth >= 0;
}

bool parse_optional_tensor(PyObject* obj, const char* name, const at::Tensor*& out) {
  if (obj == Py_None) {
    out = nullptr;
    return true;
  }
  if (!THPVariable_Check(obj)) {
    PyErr_Format(PyExc_TypeError, "fused_opt._C: %s must be a tensor or None", name);
    return false;
  }
  out = &THPVariable_Unpack(obj);
  return true;
}

// A float, or a one-element tensor (lr in the .tensor_lr overload, Adam's betas and weight decay
// too in .tensor_hyper).
bool parse_hyper(PyObject* obj, const char* name, double& out) {
  if (!THPVariable_Check(obj)) return parse_double(obj, out);
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (t.numel() != 1) {
    PyErr_Format(PyExc_RuntimeError, "fused_opt: %s must have one element", name);
    return false;
  }
  out = t.item<double>();
  return true;
}

// Runs f() with the GIL released, then rethrows what it threw: nothing may leave the GIL-free
// block by an exception (it would skip re-taking the GIL).
template <typename F>
void without_gil(const F& f) {
  std::exception_ptr error;
  Py_BEGIN_ALLOW_THREADS
  try {
    f();
  } catch (...) {
    error = std::current_exception();
  }
  Py_END_ALLOW_THREADS
  if (error) std::rethrow_exception(error);
}

// Check and prepare under the GIL, run the arithmetic without it.
template <typename Call>
PyObject* step(const Call& call) {
  try {
    const auto plan = [&] {
      if constexpr (std::is_same_v<Call, SgdCall>) {
        return plan_sgd<AtenAccess>(call);
      } else {
        return plan_adam<AtenAccess>(call);
      }
    }();
    if (!call.check_only) without_gil([&] { run_plan<AtenAccess>(plan); });
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

// ---- grads read from the params -------------------------------------------------------------
// The tensor of a param whose .grad C++ may read: a Tensor or Parameter, not a subclass (which
// may define .grad through __torch_function__); else null.
const at::Tensor* plain_param(PyObject* item) {
  return THPVariable_CheckExact(item) ? &THPVariable_Unpack(item) : nullptr;
}

// Reading one grad follows four pointers (Python object, TensorImpl, AutogradMeta, the grad's
// TensorImpl), each a cache miss after a backward pass. Before reading the grad of items[i],
// this prefetches those pointers for the params 4, 8, 12 and 16 places ahead, one level deeper
// the nearer they are, so the misses of many params overlap.
void prefetch_grads_ahead(PyObject* const* items, Py_ssize_t i, Py_ssize_t n) {
  constexpr Py_ssize_t kAhead = 4;
  if (i + 4 * kAhead < n) __builtin_prefetch(items[i + 4 * kAhead]);
  if (i + 3 * kAhead < n)
    if (const at::Tensor* t = plain_param(items[i + 3 * kAhead]))
      prefetch_tensor_impl(t->unsafeGetTensorImpl());
  if (i + 2 * kAhead < n)
    if (const at::Tensor* t = plain_param(items[i + 2 * kAhead]))
      __builtin_prefetch(t->unsafeGetTensorImpl()->autograd_meta());
  if (i + kAhead < n)
    if (const at::Tensor* t = plain_param(items[i + kAhead]))
      if (const at::Tensor& grad = t->unsafeGetTensorImpl()->grad(); grad.defined())
        prefetch_tensor_impl(grad.unsafeGetTensorImpl());
}

// grads=None in sgd_() / adam_(): each param's .grad, read here. A grad the autograd engine made
// has no Python object until Python reads it, and making one costs about 0.35 us (0.7 ms for
// 2000 params after every backward that starts from grads set to None); read here, none is
// made. Holds a reference to each grad for the call, since the GIL is released meanwhile.
struct ParamGrads {
  std::vector<at::Tensor> refs;
  std::vector<const at::Tensor*> ptrs;

  // False when a param is a subclass or has no grad: nothing is read, the caller reads them.
  bool read(PyObject* params, TensorRefs& out) {
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(params);
    PyObject* const* items = PySequence_Fast_ITEMS(params);
    refs.clear();
    refs.reserve(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      prefetch_grads_ahead(items, i, n);
      const at::Tensor* p = plain_param(items[i]);
      if (p == nullptr || !p->unsafeGetTensorImpl()->grad().defined()) {
        refs.clear();
        return false;
      }
      refs.push_back(p->unsafeGetTensorImpl()->grad());
    }
    ptrs.clear();
    for (const at::Tensor& g : refs) ptrs.push_back(&g);
    out = {ptrs.data(), ptrs.size()};
    return true;
  }

  // Drops the references; the grads' TensorImpls are cold again after the kernels ran.
  void release() {
    constexpr size_t kAhead = 8;
    for (size_t i = 0; i < refs.size(); ++i) {
      if (i + kAhead < refs.size())
        __builtin_prefetch(refs[i + kAhead].unsafeGetTensorImpl(), /*rw=*/1);
      refs[i] = at::Tensor();
    }
    refs.clear();
  }
};

// A list of grads, or None: read from the params after all arguments are parsed.
bool parse_grads(PyObject* obj, PyTensorList& list, TensorRefs& out) {
  return obj == Py_None || list.parse(obj, "grads", out);
}

// The step with the grads read from the params: True once done, False (nothing changed) when
// they cannot be read here.
template <typename Call>
PyObject* step_with_param_grads(PyObject* params, Call& call) {
  thread_local ParamGrads grads;
  if (!grads.read(params, call.grads)) Py_RETURN_FALSE;
  PyObject* done = step(call);
  grads.release();
  if (done == nullptr) return nullptr;
  Py_DECREF(done);
  Py_RETURN_TRUE;
}

template <bool kCheckOnly>
PyObject* sgd_direct(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 12) {
    PyErr_Format(PyExc_TypeError, "fused_opt._C.sgd_ takes 12 positional arguments, got %zd",
                 nargs);
    return nullptr;
  }
  thread_local PyTensorList lists[3];
  SgdCall c{};
  c.check_only = kCheckOnly;
  if (!lists[0].parse(args[0], "params", c.params) || !parse_grads(args[1], lists[1], c.grads) ||
      !lists[2].parse(args[2], "momentum_buffers", c.momentum_buffers) ||
      !parse_double(args[3], c.weight_decay) || !parse_double(args[4], c.momentum) ||
      !parse_hyper(args[5], "lr", c.lr) || !parse_double(args[6], c.dampening) ||
      !parse_bool(args[7], c.nesterov) || !parse_bool(args[8], c.maximize) ||
      !parse_bool(args[9], c.is_first_step) ||
      !parse_optional_tensor(args[10], "grad_scale", c.grad_scale) ||
      !parse_optional_tensor(args[11], "found_inf", c.found_inf))
    return nullptr;
  return args[1] == Py_None ? step_with_param_grads(args[0], c) : step(c);
}

template <bool kCheckOnly>
PyObject* adam_direct(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 16) {
    PyErr_Format(PyExc_TypeError, "fused_opt._C.adam_ takes 16 positional arguments, got %zd",
                 nargs);
    return nullptr;
  }
  thread_local PyTensorList lists[6];
  AdamCall c{};
  c.check_only = kCheckOnly;
  if (!lists[0].parse(args[0], "params", c.params) || !parse_grads(args[1], lists[1], c.grads) ||
      !lists[2].parse(args[2], "exp_avgs", c.exp_avgs) ||
      !lists[3].parse(args[3], "exp_avg_sqs", c.exp_avg_sqs) ||
      !lists[4].parse(args[4], "max_exp_avg_sqs", c.max_exp_avg_sqs) ||
      !lists[5].parse(args[5], "steps", c.steps) || !parse_hyper(args[6], "lr", c.lr) ||
      !parse_hyper(args[7], "beta1", c.beta1) || !parse_hyper(args[8], "beta2", c.beta2) ||
      !parse_hyper(args[9], "weight_decay", c.weight_decay) || !parse_double(args[10], c.eps) ||
      !parse_bool(args[11], c.amsgrad) || !parse_bool(args[12], c.maximize) ||
      !parse_bool(args[13], c.decoupled_weight_decay) ||
      !parse_optional_tensor(args[14], "grad_scale", c.grad_scale) ||
      !parse_optional_tensor(args[15], "found_inf", c.found_inf))
    return nullptr;
  return args[1] == Py_None ? step_with_param_grads(args[0], c) : step(c);
}

// ---- grads_of ---------------------------------------------------------------------------------
// ([p.grad for p in params], [indices of the params whose .grad is None]) in one call, for the
// optimizers' eager step when the kernels cannot read the grads themselves (a Python pass to find
// the Nones costs 40 us on 2000 params). Reading one param's grad at a time costs about 0.35 us
// after a backward pass; with prefetch_grads_ahead(), about a third. Subclasses other than
// Parameter are read through the attribute, as Python would.
PyObject* grads_of(PyObject*, PyObject* params) {
  if (!PyList_Check(params)) {
    PyErr_SetString(PyExc_TypeError, "fused_opt._C.grads_of: params must be a list");
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(params);
  PyObject** items = PySequence_Fast_ITEMS(params);
  PyObject* grads = PyList_New(n);
  PyObject* missing = PyList_New(0);
  if (grads == nullptr || missing == nullptr) {
    Py_XDECREF(grads);
    Py_XDECREF(missing);
    return nullptr;
  }
  // Drops both lists and returns null (a Python error is set).
  const auto fail = [&]() -> PyObject* {
    Py_DECREF(grads);
    Py_DECREF(missing);
    return nullptr;
  };
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      prefetch_grads_ahead(items, i, n);
      const at::Tensor* t = plain_param(items[i]);
      PyObject* grad =
          t != nullptr ? THPVariable_Wrap(t->grad()) : PyObject_GetAttrString(items[i], "grad");
      if (grad == nullptr) return fail();
      PyList_SET_ITEM(grads, i, grad);
      if (grad == Py_None) {
        PyObject* index = PyLong_FromSsize_t(i);
        const bool appended = index != nullptr && PyList_Append(missing, index) == 0;
        Py_XDECREF(index);
        if (!appended) return fail();
      }
    }
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return fail();
  }
  PyObject* result = PyTuple_Pack(2, grads, missing);  // holds references of its own
  Py_DECREF(grads);
  Py_DECREF(missing);
  return result;
}

// ---- same_items ------------------------------------------------------------------------------
// Whether two lists hold the same objects, by identity: a cached plan checks at every step that
// its group's params are still the ones it was built for (about 1 ns a param; in Python, 40).
PyObject* same_items(PyObject*, PyObject* args) {
  PyObject *a, *b;
  if (!PyArg_ParseTuple(args, "O!O!:same_items", &PyList_Type, &a, &PyList_Type, &b))
    return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(a);
  if (PyList_GET_SIZE(b) != n) Py_RETURN_FALSE;
  for (Py_ssize_t i = 0; i < n; ++i)
    if (PyList_GET_ITEM(a, i) != PyList_GET_ITEM(b, i)) Py_RETURN_FALSE;
  Py_RETURN_TRUE;
}

// ---- observers ---------------------------------------------------------------------------------
// Whether anything may watch an op called now: a torch function or dispatch mode, the profiler,
// or any RecordFunction callback (global or this thread's). The optimizers then call the op
// through the dispatcher, inside torch.optim's "Optimizer.step#..." range (see optim/_base.py);
// else the direct entry points, without the range. One call instead of four from Python: the
// step's Python code runs out of the caches after a backward pass, where each call into torch
// costs microseconds.
PyObject* observed(PyObject*, PyObject*) {
  return PyBool_FromLong(at::impl::torch_function_mode_enabled() ||
                         c10::impl::TorchDispatchModeTLS::stack_len() > 0 ||
                         torch::profiler::impl::profilerEnabled() || at::hasCallbacks());
}

PyMethodDef kMethods[] = {
    {"sgd_", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(sgd_direct<false>)),
     METH_FASTCALL,
     "sgd_(params, grads, momentum_buffers, weight_decay, momentum, lr, dampening, nesterov, "
     "maximize, is_first_step, grad_scale, found_inf): fused_opt::sgd_ on CPU tensors, called "
     "directly (eager mode only: no dispatcher, no torch.compile tracing)."},
    {"adam_", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(adam_direct<false>)),
     METH_FASTCALL,
     "adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2, "
     "weight_decay, eps, amsgrad, maximize, decoupled_weight_decay, grad_scale, found_inf): "
     "fused_opt::adam_ on CPU tensors, called directly (eager mode only)."},
    {"check_sgd_", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(sgd_direct<true>)),
     METH_FASTCALL,
     "check_sgd_(...): sgd_()'s checks alone, changing nothing (True once checked, False when "
     "grads=None and the grads cannot be read here)."},
    {"check_adam_", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(adam_direct<true>)),
     METH_FASTCALL, "check_adam_(...): adam_()'s checks alone, changing nothing."},
    {"same_items", same_items, METH_VARARGS,
     "same_items(a, b): whether lists a and b hold the same objects in the same order."},
    {"observed", observed, METH_NOARGS,
     "Whether a torch function or dispatch mode, the profiler or any RecordFunction callback may "
     "watch op calls made now."},
    {"grads_of", grads_of, METH_O,
     "grads_of(params): ([p.grad for p in params], indices of the params without a grad), "
     "with the cache misses of many params overlapped (eager mode only)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C_direct",
                       "Direct entry points to fused_opt's CPU step (eager mode, one torch).", -1,
                       kMethods};

}  // namespace

// Takes the kernel choice of fused_opt._C (imported first: it owns FUSED_OPT_CPU_ISA and
// set_isa), so both front ends always run the same variant.
PyMODINIT_FUNC PyInit__C_direct(void) {
  PyObject* stable = PyImport_ImportModule("fused_opt._C");
  if (stable == nullptr) return nullptr;
  PyObject* capsule = PyObject_GetAttrString(stable, "_active_kernels");
  Py_DECREF(stable);
  if (capsule == nullptr) return nullptr;
  void* table = PyCapsule_GetPointer(capsule, "fused_opt._C._active_kernels");
  Py_DECREF(capsule);
  if (table == nullptr) return nullptr;
  direct_active_kernels = reinterpret_cast<const KernelTable* (*)()>(table);
  return PyModule_Create(&kModule);
}
