// The torch glue of the CUDA kernels: checks, device guard, current stream, registration.
//
// Registers the CUDA implementations of fused_opt::sgd_ and fused_opt::adam_ (schemas defined in
// fused_opt/_ops.py). Everything is checked before anything is modified. The kernels themselves
// (fused_kernels.h) know nothing of torch. The glue uses torch's stable ABI only (and CPython's
// limited API), so one binary serves every torch from the target version on, and
// tools/check_cuda.sh can syntax-check it against a CPU build of torch.
#include <Python.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <array>
#include <atomic>
#include <exception>
#include <initializer_list>
#include <optional>
#include <utility>
#include <vector>

#include "../cpu/stable_tensor.h"
#include "../cpu/step_impl.h"  // the checks' helpers: shapes and devices as text
#include "fused_kernels.h"

namespace fused_opt {
namespace cuda {
namespace {

using fused_opt_cpu::StableAccess;
using torch::headeronly::ScalarType;
using torch::stable::Tensor;
namespace step_detail = fused_opt_cpu::step_detail;
using TensorList = const std::vector<Tensor>&;
using torch::stable::accelerator::DeviceIndex;

// A device as the messages name it ("cuda:0", "cpu").
std::string device_name(const Tensor& t) { return step_detail::device_name_of(t); }
std::string cuda_name(DeviceIndex index) { return "cuda:" + std::to_string(index); }
std::string shape(const Tensor& t) { return step_detail::shape_of(t); }
bool on(const Tensor& t, DeviceIndex index) { return t.is_cuda() && t.get_device() == index; }

DType dtype_of(const Tensor& t, const char* op, size_t i) {
  switch (t.scalar_type()) {
    case ScalarType::Float: return DType::kFloat32;
    case ScalarType::Double: return DType::kFloat64;
    case ScalarType::Half: return DType::kFloat16;
    case ScalarType::BFloat16: return DType::kBFloat16;
    default:
      FUSED_OPT_CHECK(false, "fused_opt.", op, ": params[", i, "] has dtype ", t.scalar_type(),
                      "; the CUDA kernels take float32, float64, float16 and bfloat16");
  }
}

void check_length(const char* op, const char* name, TensorList list, size_t expected) {
  FUSED_OPT_CHECK(list.size() == expected, "fused_opt.", op, ": expected ", expected, " ", name,
                  ", got ", list.size());
}

// The kernels index every list flat, so all tensors of a param must share one dense layout.
bool same_dense_layout(const Tensor& a, const Tensor& b) {
  if (!StableAccess::dense(a) || !StableAccess::dense(b)) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

void check_param(const char* op, size_t i, const Tensor& p, DeviceIndex device) {
  FUSED_OPT_CHECK(StableAccess::strided(p), "fused_opt.", op, ": params[", i,
                  "] is not a strided tensor; only strided tensors are supported");
  FUSED_OPT_CHECK(on(p, device), "fused_opt.", op, ": params[", i, "] is on ", device_name(p),
                  " but params[0] is on ", cuda_name(device),
                  "; one call takes the tensors of one device");
  dtype_of(p, op, i);
  FUSED_OPT_CHECK(StableAccess::dense(p), "fused_opt.", op, ": params[", i,
                  "] is not dense (a strided view); the CUDA kernels need dense params");
}

// State tensors are written in place, so they must share their param's layout; grads may differ
// (they are then read through a copy, see grads_in_param_layout).
void check_like_param(const char* op, const char* name, size_t i, const Tensor& t, const Tensor& p,
                      bool same_layout) {
  FUSED_OPT_CHECK(StableAccess::strided(t), "fused_opt.", op, ": ", name, "[", i,
                  "] is not a strided tensor; sparse gradients are not supported");
  FUSED_OPT_CHECK(step_detail::same_sizes(t, p) && on(t, p.get_device()), "fused_opt.", op, ": ",
                  name, "[", i, "] has shape ", shape(t), " on ", device_name(t), ", expected ",
                  shape(p), " on ", device_name(p), " like params[", i, "]");
  FUSED_OPT_CHECK(t.scalar_type() == p.scalar_type(), "fused_opt.", op, ": ", name, "[", i,
                  "] has dtype ", t.scalar_type(), ", expected ", p.scalar_type(), " like params[",
                  i, "]");
  FUSED_OPT_CHECK(!same_layout || same_dense_layout(t, p), "fused_opt.", op, ": ", name, "[", i,
                  "] has strides ", step_detail::strides_of(t), ", expected ",
                  step_detail::strides_of(p), " like params[", i, "]");
}

void check_lists(const char* op, TensorList params, TensorList grads,
                 std::initializer_list<std::pair<const char*, TensorList>> states) {
  FUSED_OPT_CHECK(params[0].is_cuda(), "fused_opt.", op, ": params are on ", device_name(params[0]),
                  ", not on a CUDA device");
  const DeviceIndex device = params[0].get_device();
  for (size_t i = 0; i < params.size(); ++i) {
    check_param(op, i, params[i], device);
    check_like_param(op, "grads", i, grads[i], params[i], /*same_layout=*/false);
    for (const auto& [name, list] : states) {
      check_like_param(op, name, i, list[i], params[i], /*same_layout=*/true);
    }
  }
}

// The grads as the kernels read them: a grad laid out unlike its param (e.g. contiguous for a
// channels_last param, or a strided view) is copied into the param's layout on the current stream.
std::vector<Tensor> grads_in_param_layout(TensorList params, TensorList grads) {
  std::vector<Tensor> readable(grads.begin(), grads.end());
  for (size_t i = 0; i < params.size(); ++i) {
    if (same_dense_layout(grads[i], params[i])) continue;
    readable[i] = torch::stable::empty_like(params[i]);  // dense: in params[i]'s strides
    torch::stable::copy_(readable[i], grads[i]);
  }
  return readable;
}

// grad_scale / found_inf: fp32 scalars on the params' device, read by the kernels.
const float* device_scalar(const char* op, const char* name, const std::optional<Tensor>& t,
                           DeviceIndex device) {
  if (!t.has_value()) return nullptr;
  FUSED_OPT_CHECK(t->numel() == 1 && t->scalar_type() == ScalarType::Float && on(*t, device),
                  "fused_opt.", op, ": ", name, " must be a 1-element float32 tensor on ",
                  cuda_name(device), ", got ", t->scalar_type(), " ", shape(*t), " on ",
                  device_name(*t));
  return static_cast<const float*>(t->const_data_ptr());
}

// A hyper-parameter as the schema passes it: a float, or a 1-element tensor.
struct HyperArg {
  double value;
  const Tensor* tensor;  // null for a float
  HyperArg(double v) : value(v), tensor(nullptr) {}
  HyperArg(const Tensor& t) : value(0.0), tensor(&t) {}
};

// A float or CPU tensor is read here; a device tensor is read by the kernels (no synchronisation).
HyperParam hyper_param(const char* op, const char* name, const HyperArg& arg, DeviceIndex device) {
  if (arg.tensor == nullptr) return HyperParam{arg.value, nullptr, false};
  const Tensor& t = *arg.tensor;
  const bool is_double = t.scalar_type() == ScalarType::Double;
  FUSED_OPT_CHECK(
      t.numel() == 1 && (t.scalar_type() == ScalarType::Float || is_double), "fused_opt.", op, ": ",
      name, " must be a 1-element float32 or float64 tensor, got ", t.scalar_type(), " ", shape(t));
  if (t.is_cpu()) return HyperParam{StableAccess::item(t), nullptr, false};
  FUSED_OPT_CHECK(on(t, device), "fused_opt.", op, ": ", name, " is on ", device_name(t),
                  ", expected the CPU or the params' device ", cuda_name(device));
  return HyperParam{0.0, t.const_data_ptr(), is_double};
}

void check_launch(const char* op, cudaError_t error) {
  FUSED_OPT_CHECK(error == cudaSuccess, "fused_opt.", op,
                  ": CUDA error: ", cudaGetErrorString(error));
}

// torch's current stream on `device` (AOTInductor's C shim, part of the stable ABI).
cudaStream_t current_stream(const char* op, DeviceIndex device) {
  void* stream = nullptr;
  FUSED_OPT_CHECK(aoti_torch_get_current_cuda_stream(device, &stream) == AOTI_TORCH_SUCCESS,
                  "fused_opt.", op, ": could not get the current CUDA stream of ",
                  cuda_name(device));
  return static_cast<cudaStream_t>(stream);
}

// Whether the binary holds code for device `index` (see kernel_image_status), asked of the
// runtime once per device. Only a definite answer is kept: another error (out of memory while
// the module loads, a sticky error of earlier work) is returned as it is and asked again later.
bool is_arch_error(cudaError_t error) {
  return error == cudaErrorNoKernelImageForDevice || error == cudaErrorInvalidDeviceFunction ||
         error == cudaErrorUnsupportedPtxVersion || error == cudaErrorInvalidKernelImage;
}

cudaError_t kernel_image_on(DeviceIndex index) {
  constexpr int kCachedDevices = 64;
  static std::array<std::atomic<int>, kCachedDevices> known{};  // 0 unknown, else error + 1
  const torch::stable::accelerator::DeviceGuard guard(index);
  const bool cached = index >= 0 && index < kCachedDevices;
  if (cached) {
    if (const int seen = known[index].load(std::memory_order_relaxed); seen != 0) {
      return static_cast<cudaError_t>(seen - 1);
    }
  }
  const cudaError_t status = kernel_image_status();
  if (cached && (status == cudaSuccess || is_arch_error(status))) {
    known[index].store(static_cast<int>(status) + 1, std::memory_order_relaxed);
  }
  return status;
}

// Before the first launch of a call: a GPU whose arch the binary lacks gets this error instead
// of "no kernel image is available" (the optimizers send such a device to the torch backend
// before they get here: fused_opt/_ops.py), and a CUDA error left pending by earlier work is
// reported as that, not as fused_opt's.
void check_before_launch(const char* op, DeviceIndex device) {
  const cudaError_t image = kernel_image_on(device);
  FUSED_OPT_CHECK(!is_arch_error(image), "fused_opt.", op, ": the CUDA kernels hold no code that ",
                  cuda_name(device), " can run (", cudaGetErrorString(image),
                  "); rebuild for its arch (TORCH_CUDA_ARCH_LIST) or use backend='torch'");
  FUSED_OPT_CHECK(image == cudaSuccess, "fused_opt.", op,
                  ": CUDA error before the first launch: ", cudaGetErrorString(image));
  const cudaError_t pending = cudaPeekAtLastError();
  FUSED_OPT_CHECK(pending == cudaSuccess, "fused_opt.", op, ": a CUDA error from earlier work is ",
                  "pending (", cudaGetErrorString(pending), "); fused_opt launched nothing and ",
                  "changed nothing. CUDA_LAUNCH_BLOCKING=1 shows where it arose");
}

// ---- SGD ------------------------------------------------------------------------------------
struct SgdHyper {
  HyperArg lr;
  double weight_decay, momentum, dampening;
  bool nesterov, maximize, is_first_step;
};

void sgd_cuda(TensorList params, TensorList grads, TensorList momentum_buffers, const SgdHyper& h,
              const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf) {
  constexpr const char* op = "sgd_";
  const size_t n = params.size();
  check_length(op, "grads", grads, n);
  if (h.momentum != 0.0) {
    check_length(op, "momentum_buffers", momentum_buffers, n);
  } else {
    FUSED_OPT_CHECK(momentum_buffers.empty() || momentum_buffers.size() == n, "fused_opt.", op,
                    ": expected 0 or ", n, " momentum_buffers, got ", momentum_buffers.size());
  }
  if (n == 0) return;
  const bool use_buffers = h.momentum != 0.0;
  if (use_buffers) {
    check_lists(op, params, grads, {{"momentum_buffers", momentum_buffers}});
  } else {
    check_lists(op, params, grads, {});
  }
  const DeviceIndex device = params[0].get_device();
  SgdOptions options{};
  options.lr = hyper_param(op, "lr", h.lr, device);
  options.weight_decay = h.weight_decay;
  options.momentum = h.momentum;
  options.dampening = h.dampening;
  options.nesterov = h.nesterov;
  options.maximize = h.maximize;
  options.is_first_step = h.is_first_step;
  options.grad_scale = device_scalar(op, "grad_scale", grad_scale, device);
  options.found_inf = device_scalar(op, "found_inf", found_inf, device);

  const torch::stable::accelerator::DeviceGuard guard(device);
  check_before_launch(op, device);
  const cudaStream_t stream = current_stream(op, device);
  const std::vector<Tensor> readable_grads = grads_in_param_layout(params, grads);
  std::vector<SgdTensor> tensors(n);
  for (size_t i = 0; i < n; ++i) {
    tensors[i] = SgdTensor{dtype_of(params[i], op, i), params[i].numel(),
                           params[i].mutable_data_ptr(), readable_grads[i].const_data_ptr(),
                           use_buffers ? momentum_buffers[i].mutable_data_ptr() : nullptr};
  }
  check_launch(op, launch_sgd(tensors.data(), static_cast<int64_t>(n), options, stream));
}

void sgd_float_lr(TensorList params, TensorList grads, TensorList momentum_buffers,
                  double weight_decay, double momentum, double lr, double dampening, bool nesterov,
                  bool maximize, bool is_first_step, const std::optional<Tensor>& grad_scale,
                  const std::optional<Tensor>& found_inf) {
  sgd_cuda(params, grads, momentum_buffers,
           SgdHyper{lr, weight_decay, momentum, dampening, nesterov, maximize, is_first_step},
           grad_scale, found_inf);
}

void sgd_tensor_lr(TensorList params, TensorList grads, TensorList momentum_buffers,
                   double weight_decay, double momentum, const Tensor& lr, double dampening,
                   bool nesterov, bool maximize, bool is_first_step,
                   const std::optional<Tensor>& grad_scale,
                   const std::optional<Tensor>& found_inf) {
  sgd_cuda(params, grads, momentum_buffers,
           SgdHyper{lr, weight_decay, momentum, dampening, nesterov, maximize, is_first_step},
           grad_scale, found_inf);
}

// ---- Adam / AdamW ---------------------------------------------------------------------------
struct AdamHyper {
  HyperArg lr, beta1, beta2, weight_decay;
  double eps;
  bool amsgrad, maximize, decoupled_weight_decay;
};

// Steps are 1-element fp32 tensors (fp64 when torch's default dtype is fp64), all on the CPU
// (read and incremented here) or all on the params' device (capturable: read and incremented by
// the kernels). Returns whether they are on the device.
bool check_steps(const char* op, TensorList steps, DeviceIndex device) {
  const bool on_device = on(steps[0], device);
  for (size_t i = 0; i < steps.size(); ++i) {
    const Tensor& s = steps[i];
    FUSED_OPT_CHECK(
        s.numel() == 1 &&
            (s.scalar_type() == ScalarType::Float || s.scalar_type() == ScalarType::Double),
        "fused_opt.", op, ": steps[", i, "] must be a 1-element float32 or float64 tensor, got ",
        s.scalar_type(), " ", shape(s));
    FUSED_OPT_CHECK(on_device ? on(s, device) : s.is_cpu(), "fused_opt.", op, ": steps[", i,
                    "] is on ", device_name(s), "; steps must all be on the CPU or all on ",
                    cuda_name(device), " (capturable)");
  }
  return on_device;
}

// Host step + 1 in the counter's own precision (torch adds 1 to the tensor).
double next_host_step(const Tensor& step) {
  if (step.scalar_type() == ScalarType::Double)
    return *static_cast<const double*>(step.const_data_ptr()) + 1.0;
  return static_cast<double>(*static_cast<const float*>(step.const_data_ptr()) + 1.0f);
}

void store_host_step(const Tensor& step, double value) {
  if (step.scalar_type() == ScalarType::Double) {
    *static_cast<double*>(step.mutable_data_ptr()) = value;
  } else {
    *static_cast<float*>(step.mutable_data_ptr()) = static_cast<float>(value);  // exact: a float
  }
}

void adam_cuda(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
               TensorList max_exp_avg_sqs, TensorList steps, const AdamHyper& h,
               const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf) {
  constexpr const char* op = "adam_";
  const size_t n = params.size();
  check_length(op, "grads", grads, n);
  check_length(op, "exp_avgs", exp_avgs, n);
  check_length(op, "exp_avg_sqs", exp_avg_sqs, n);
  check_length(op, "steps", steps, n);
  if (h.amsgrad) {
    check_length(op, "max_exp_avg_sqs", max_exp_avg_sqs, n);
  } else {
    FUSED_OPT_CHECK(max_exp_avg_sqs.empty() || max_exp_avg_sqs.size() == n, "fused_opt.", op,
                    ": expected 0 or ", n, " max_exp_avg_sqs, got ", max_exp_avg_sqs.size());
  }
  if (n == 0) return;
  if (h.amsgrad) {
    check_lists(op, params, grads,
                {{"exp_avgs", exp_avgs},
                 {"exp_avg_sqs", exp_avg_sqs},
                 {"max_exp_avg_sqs", max_exp_avg_sqs}});
  } else {
    check_lists(op, params, grads, {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}});
  }
  const DeviceIndex device = params[0].get_device();
  const bool capturable = check_steps(op, steps, device);
  AdamOptions options{};
  options.lr = hyper_param(op, "lr", h.lr, device);
  options.beta1 = hyper_param(op, "beta1", h.beta1, device);
  options.beta2 = hyper_param(op, "beta2", h.beta2, device);
  options.weight_decay = hyper_param(op, "weight_decay", h.weight_decay, device);
  options.eps = h.eps;
  options.amsgrad = h.amsgrad;
  options.maximize = h.maximize;
  options.decoupled_weight_decay = h.decoupled_weight_decay;
  options.capturable = capturable;
  options.grad_scale = device_scalar(op, "grad_scale", grad_scale, device);
  options.found_inf = device_scalar(op, "found_inf", found_inf, device);
  FUSED_OPT_CHECK(
      betas_usable(options), "fused_opt.", op, ": betas on ", cuda_name(device),
      " need the steps there too (capturable=True): without, the host computes the bias ",
      "corrections");

  const torch::stable::accelerator::DeviceGuard guard(device);
  check_before_launch(op, device);
  const cudaStream_t stream = current_stream(op, device);
  if (!capturable) {
    // A graph would replay the host step counts of the capture: refuse instead.
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    check_launch(op, cudaStreamIsCapturing(stream, &capture));
    FUSED_OPT_CHECK(capture == cudaStreamCaptureStatusNone, "fused_opt.", op,
                    ": capturing a CUDA graph needs the steps on the device (capturable=True)");
    // Host step counts cannot depend on a device flag without reading it: the one
    // synchronisation of the non-capturable path, and only when a GradScaler passes found_inf.
    if (found_inf.has_value() && StableAccess::item(*found_inf) != 0.0) return;
  }

  const std::vector<Tensor> readable_grads = grads_in_param_layout(params, grads);
  std::vector<AdamTensor> tensors(n);
  std::vector<double> new_steps(n);
  std::vector<void*> device_steps[2];  // fp32 and fp64 counters
  for (size_t i = 0; i < n; ++i) {
    AdamTensor& t = tensors[i];
    t.dtype = dtype_of(params[i], op, i);
    t.numel = params[i].numel();
    t.param = params[i].mutable_data_ptr();
    t.grad = readable_grads[i].const_data_ptr();
    t.exp_avg = exp_avgs[i].mutable_data_ptr();
    t.exp_avg_sq = exp_avg_sqs[i].mutable_data_ptr();
    t.max_exp_avg_sq = h.amsgrad ? max_exp_avg_sqs[i].mutable_data_ptr() : nullptr;
    t.device_step_is_double = steps[i].scalar_type() == ScalarType::Double;
    if (capturable) {
      t.device_step = steps[i].mutable_data_ptr();
      device_steps[t.device_step_is_double].push_back(steps[i].mutable_data_ptr());
      t.step = 0.0;
    } else {
      new_steps[i] = next_host_step(steps[i]);
      t.step = new_steps[i];
      t.device_step = nullptr;
    }
  }
  check_launch(op, launch_adam(tensors.data(), static_cast<int64_t>(n), options, stream));
  if (capturable) {
    for (const bool is_double : {false, true}) {
      const std::vector<void*>& counters = device_steps[is_double];
      if (counters.empty()) continue;
      check_launch(op,
                   launch_increment_steps(counters.data(), static_cast<int64_t>(counters.size()),
                                          is_double, options.found_inf, stream));
    }
  } else {
    for (size_t i = 0; i < n; ++i) store_host_step(steps[i], new_steps[i]);
  }
}

void adam_float_lr(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                   TensorList max_exp_avg_sqs, TensorList steps, double lr, double beta1,
                   double beta2, double weight_decay, double eps, bool amsgrad, bool maximize,
                   bool decoupled_weight_decay, const std::optional<Tensor>& grad_scale,
                   const std::optional<Tensor>& found_inf) {
  adam_cuda(
      params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
      AdamHyper{lr, beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay},
      grad_scale, found_inf);
}

void adam_tensor_lr(TensorList params, TensorList grads, TensorList exp_avgs,
                    TensorList exp_avg_sqs, TensorList max_exp_avg_sqs, TensorList steps,
                    const Tensor& lr, double beta1, double beta2, double weight_decay, double eps,
                    bool amsgrad, bool maximize, bool decoupled_weight_decay,
                    const std::optional<Tensor>& grad_scale,
                    const std::optional<Tensor>& found_inf) {
  adam_cuda(
      params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
      AdamHyper{lr, beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay},
      grad_scale, found_inf);
}

// lr, the betas and weight decay as tensors: on the device they are read by the kernels only.
void adam_tensor_hyper(TensorList params, TensorList grads, TensorList exp_avgs,
                       TensorList exp_avg_sqs, TensorList max_exp_avg_sqs, TensorList steps,
                       const Tensor& lr, const Tensor& beta1, const Tensor& beta2,
                       const Tensor& weight_decay, double eps, bool amsgrad, bool maximize,
                       bool decoupled_weight_decay, const std::optional<Tensor>& grad_scale,
                       const std::optional<Tensor>& found_inf) {
  adam_cuda(
      params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
      AdamHyper{lr, beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay},
      grad_scale, found_inf);
}

// fused_opt._C_cuda.kernel_image_problem(index): None when the kernels run on cuda:index, the
// runtime's reason when the binary holds no code for it, and RuntimeError when the runtime
// could not tell (asked by fused_opt/_ops.py before a device is given to this backend).
PyObject* kernel_image_problem(PyObject*, PyObject* arg) {
  const long index = PyLong_AsLong(arg);
  if (index == -1 && PyErr_Occurred()) return nullptr;
  cudaError_t error = cudaSuccess;
  try {
    error = kernel_image_on(static_cast<DeviceIndex>(index));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  if (error == cudaSuccess) Py_RETURN_NONE;
  if (!is_arch_error(error)) {
    PyErr_Format(PyExc_RuntimeError, "CUDA error while probing cuda:%ld: %s", index,
                 cudaGetErrorString(error));
    return nullptr;
  }
  return PyUnicode_FromString(cudaGetErrorString(error));
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fused_opt, CUDA, m) {
  m.impl("sgd_", TORCH_BOX(&sgd_float_lr));
  m.impl("sgd_.tensor_lr", TORCH_BOX(&sgd_tensor_lr));
  m.impl("adam_", TORCH_BOX(&adam_float_lr));
  m.impl("adam_.tensor_lr", TORCH_BOX(&adam_tensor_lr));
  m.impl("adam_.tensor_hyper", TORCH_BOX(&adam_tensor_hyper));
}

}  // namespace cuda
}  // namespace fused_opt

// fused_opt._C_cuda: importing it registers the kernels above. Its constants say how many tensors
// one launch carries (non-capturable Adam; capturable carries a few more).
PyMODINIT_FUNC PyInit__C_cuda(void) {
  static PyMethodDef methods[] = {
      {"kernel_image_problem", fused_opt::cuda::kernel_image_problem, METH_O,
       "kernel_image_problem(index): None if the kernels run on cuda:index, else why not."},
      {nullptr, nullptr, 0, nullptr}};
  static PyModuleDef module = {PyModuleDef_HEAD_INIT,
                               "_C_cuda",
                               "fused_opt CUDA kernels (registered with the dispatcher)",
                               -1,
                               methods,
                               nullptr,
                               nullptr,
                               nullptr,
                               nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  using namespace fused_opt::cuda;
  const std::pair<const char*, int> constants[] = {
      {"MAX_TENSORS_PER_LAUNCH_SGD", max_tensors_per_launch_sgd(false)},
      {"MAX_TENSORS_PER_LAUNCH_SGD_MOMENTUM", max_tensors_per_launch_sgd(true)},
      {"MAX_TENSORS_PER_LAUNCH_ADAM", max_tensors_per_launch_adam(false, false)},
      {"MAX_TENSORS_PER_LAUNCH_ADAM_AMSGRAD", max_tensors_per_launch_adam(true, false)},
  };
  for (const auto& [name, value] : constants) {
    if (PyModule_AddIntConstant(m, name, value) != 0) {
      Py_DECREF(m);
      return nullptr;
    }
  }
  return m;
}
