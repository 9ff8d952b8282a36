// Adam / AdamW (amsgrad, maximize, L2 or decoupled weight decay) over multi_tensor_apply.
//
// Step counts: non-capturable calls pass each tensor's new step (read and incremented on the
// host) and the host computes the bias corrections in double; capturable calls pass the device
// counters, which the kernel reads (+1) to compute them, and launch_increment_steps then adds 1
// on the device, so the whole step is graph-capturable and never synchronises.
#include <type_traits>

#include "fused_kernels.h"
#include "multi_tensor_apply.cuh"
#include "op_common.cuh"
#include "optimizer_math.cuh"

namespace fused_opt {
namespace cuda {
namespace {

struct AdamArgs {
  LearningRate lr;
  double beta1;
  double beta2;
  double weight_decay;
  double eps;
  const float* grad_scale;
  const float* found_inf;
  bool maximize;
  bool decoupled_weight_decay;
};

struct HostBiasCorrections {
  double bias_correction1;
  double bias_correction2_sqrt;
};

struct DeviceStep {
  const void* step;  // before this step's increment
  bool is_double;
};

// Lists: 0 param, 1 grad (read only), 2 exp_avg, 3 exp_avg_sq, 4 max_exp_avg_sq (amsgrad only).
template <typename T, bool kAmsgrad, bool kCapturable>
struct AdamOp {
  using Storage = T;
  using Compute = typename ComputeTypeOf<T>::type;
  using Args = AdamArgs;
  using PerTensor = std::conditional_t<kCapturable, DeviceStep, HostBiasCorrections>;
  static constexpr int kLists = kAmsgrad ? 5 : 4;
  static constexpr bool writes(int list) { return list != 1; }

  math::AdamScalars<Compute> s;

  __device__ AdamOp(const Args& a, const PerTensor& tensor) {
    const double lr = load_learning_rate(a.lr);
    double bias_correction1;
    double bias_correction2_sqrt;
    if constexpr (kCapturable) {
      // The increment in the counter's own precision, like torch's foreach add.
      const double step = tensor.is_double
                              ? *static_cast<const double*>(tensor.step) + 1.0
                              : static_cast<double>(*static_cast<const float*>(tensor.step) + 1.0f);
      bias_correction1 = math::bias_correction(a.beta1, step);
      bias_correction2_sqrt = sqrt(math::bias_correction(a.beta2, step));
    } else {
      bias_correction1 = tensor.bias_correction1;
      bias_correction2_sqrt = tensor.bias_correction2_sqrt;
    }
    s = math::make_adam_scalars<Compute>(
        lr, a.beta1, a.beta2, a.weight_decay, a.eps, bias_correction1, bias_correction2_sqrt,
        kAmsgrad, a.maximize, a.decoupled_weight_decay, a.grad_scale != nullptr,
        a.grad_scale != nullptr ? *a.grad_scale : 1.0f);
  }

  __device__ __forceinline__ void operator()(Compute (&x)[kLists]) const {
    if constexpr (kAmsgrad) {
      math::adam_update(x[0], x[1], x[2], x[3], x[4], s);
    } else {
      Compute no_max = Compute(0);
      math::adam_update(x[0], x[1], x[2], x[3], no_max, s);
    }
  }
};

template <typename T, bool kAmsgrad, bool kCapturable>
cudaError_t launch_adam_group(const AdamTensor* tensors, int64_t count, DType dtype,
                              const AdamArgs& args, cudaStream_t stream) {
  using Op = AdamOp<T, kAmsgrad, kCapturable>;
  auto describe = [&](int64_t i, TensorSlot<Op::kLists, typename Op::PerTensor>& slot) {
    const AdamTensor& t = tensors[i];
    if (t.dtype != dtype) return false;
    slot.ptrs[0] = t.param;
    slot.ptrs[1] = const_cast<void*>(t.grad);  // never written: writes(1) is false
    slot.ptrs[2] = t.exp_avg;
    slot.ptrs[3] = t.exp_avg_sq;
    if constexpr (kAmsgrad) slot.ptrs[4] = t.max_exp_avg_sq;
    slot.numel = t.numel;
    if constexpr (kCapturable) {
      slot.per_tensor.step = t.device_step;
      slot.per_tensor.is_double = t.device_step_is_double;
    } else {
      slot.per_tensor.bias_correction1 = math::bias_correction(args.beta1, t.step);
      slot.per_tensor.bias_correction2_sqrt = sqrt(math::bias_correction(args.beta2, t.step));
    }
    return true;
  };
  return launch_multi_tensor<Op>(count, describe, args, stream);
}

template <typename T>
struct AdamLauncher {
  static cudaError_t run(const AdamTensor* tensors, int64_t count, DType dtype,
                         const AdamOptions& options, const AdamArgs& args, cudaStream_t stream) {
    if (options.amsgrad) {
      return options.capturable
                 ? launch_adam_group<T, true, true>(tensors, count, dtype, args, stream)
                 : launch_adam_group<T, true, false>(tensors, count, dtype, args, stream);
    }
    return options.capturable
               ? launch_adam_group<T, false, true>(tensors, count, dtype, args, stream)
               : launch_adam_group<T, false, false>(tensors, count, dtype, args, stream);
  }
};

// ---- capturable step counters ------------------------------------------------------------------
constexpr int kStepsPerLaunch = static_cast<int>((kKernelParamBytes - 64) / sizeof(void*));

struct StepTable {
  void* steps[kStepsPerLaunch];
  int32_t count;
};

template <typename S>
__global__ void increment_steps_kernel(const __grid_constant__ StepTable table,
                                       const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < table.count) *static_cast<S*>(table.steps[i]) += S(1);
}

}  // namespace

cudaError_t launch_adam(const AdamTensor* tensors, int64_t count, const AdamOptions& options,
                        cudaStream_t stream) {
  const AdamArgs args{options.lr,           options.beta1,    options.beta2,
                      options.weight_decay, options.eps,      options.grad_scale,
                      options.found_inf,    options.maximize, options.decoupled_weight_decay};
  for (const DType dtype : kAllDTypes) {
    if (!contains_dtype(tensors, count, dtype)) continue;
    const cudaError_t error =
        dispatch_dtype<AdamLauncher>(dtype, tensors, count, dtype, options, args, stream);
    if (error != cudaSuccess) return error;
  }
  return cudaSuccess;
}

cudaError_t launch_increment_steps(void* const* steps, int64_t count, bool is_double,
                                   const float* found_inf, cudaStream_t stream) {
  constexpr int kThreads = 256;
  StepTable table;
  for (int64_t first = 0; first < count; first += kStepsPerLaunch) {
    const int64_t remaining = count - first;
    table.count = static_cast<int32_t>(remaining < kStepsPerLaunch ? remaining : kStepsPerLaunch);
    for (int i = 0; i < table.count; ++i) table.steps[i] = steps[first + i];
    const unsigned blocks = static_cast<unsigned>((table.count + kThreads - 1) / kThreads);
    if (is_double) {
      increment_steps_kernel<double><<<blocks, kThreads, 0, stream>>>(table, found_inf);
    } else {
      increment_steps_kernel<float><<<blocks, kThreads, 0, stream>>>(table, found_inf);
    }
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  return cudaSuccess;
}

int max_tensors_per_launch_adam(bool amsgrad, bool capturable) {
  if (amsgrad) {
    return capturable ? TensorTable<5, DeviceStep>::kMaxTensors
                      : TensorTable<5, HostBiasCorrections>::kMaxTensors;
  }
  return capturable ? TensorTable<4, DeviceStep>::kMaxTensors
                    : TensorTable<4, HostBiasCorrections>::kMaxTensors;
}

}  // namespace cuda
}  // namespace fused_opt
