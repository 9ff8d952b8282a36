// Adam / AdamW over multi_tensor_apply: the op a thread applies and the launch planning of a call.
//
// Step counts: non-capturable calls pass each tensor's new step (read and incremented on the
// host) and the bias corrections are computed here in double; capturable calls pass the device
// counters, which each block reads (+1) to compute them, and launch_increment_steps (adam.cu)
// then adds 1 on the device, so the whole step is graph-capturable and never synchronises. lr,
// the betas and weight decay may be device scalars, read by each block (the betas only when
// capturable: a host bias correction needs host betas).
// Plain C++ for a host compiler too (see multi_tensor_apply.cuh).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernel_types.h"
#include "multi_tensor_apply.cuh"
#include "op_common.cuh"
#include "optimizer_math.cuh"

namespace fused_opt {
namespace cuda {

struct AdamArgs {
  HyperParam lr;
  HyperParam beta1;
  HyperParam beta2;
  HyperParam weight_decay;
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

  FUSED_OPT_HOST_DEVICE AdamOp(const Args& a, const PerTensor& tensor) {
    const double beta1 = load_hyper(a.beta1);
    const double beta2 = load_hyper(a.beta2);
    double bias_correction1;
    double bias_correction2_sqrt;
    if constexpr (kCapturable) {
      // The increment in the counter's own precision, like torch's foreach add.
      const double step = tensor.is_double
                              ? *static_cast<const double*>(tensor.step) + 1.0
                              : static_cast<double>(*static_cast<const float*>(tensor.step) + 1.0f);
      bias_correction1 = math::bias_correction(beta1, step);
      bias_correction2_sqrt = sqrt(math::bias_correction(beta2, step));
    } else {
      bias_correction1 = tensor.bias_correction1;
      bias_correction2_sqrt = tensor.bias_correction2_sqrt;
    }
    s = math::make_adam_scalars<Compute>(
        load_hyper(a.lr), beta1, beta2, load_hyper(a.weight_decay), a.eps, bias_correction1,
        bias_correction2_sqrt, kAmsgrad, a.maximize, a.decoupled_weight_decay,
        a.grad_scale != nullptr, a.grad_scale != nullptr ? *a.grad_scale : 1.0f);
  }

  FUSED_OPT_HOST_DEVICE void operator()(Compute (&x)[kLists]) const {
    if constexpr (kAmsgrad) {
      math::adam_update(x[0], x[1], x[2], x[3], x[4], s);
    } else {
      Compute no_max = Compute(0);
      math::adam_update(x[0], x[1], x[2], x[3], no_max, s);
    }
  }
};

// The tensors of one dtype of a call, handed to the launcher table by table.
template <typename Launcher>
struct AdamGroup {
  const AdamTensor* tensors;
  int64_t count;
  DType dtype;
  const AdamOptions& options;
  const AdamArgs& args;
  Launcher& launcher;

  template <typename T>
  bool run() {
    if (options.amsgrad) {
      return options.capturable ? run_lists<T, true, true>() : run_lists<T, true, false>();
    }
    return options.capturable ? run_lists<T, false, true>() : run_lists<T, false, false>();
  }

  template <typename T, bool kAmsgrad, bool kCapturable>
  bool run_lists() {
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
        slot.per_tensor.bias_correction1 = math::bias_correction(args.beta1.value, t.step);
        slot.per_tensor.bias_correction2_sqrt =
            std::sqrt(math::bias_correction(args.beta2.value, t.step));
      }
      return true;
    };
    return launch_multi_tensor<Op>(count, describe, args, launcher);
  }
};

inline AdamArgs make_adam_args(const AdamOptions& options) {
  return AdamArgs{options.lr,           options.beta1,    options.beta2,
                  options.weight_decay, options.eps,      options.grad_scale,
                  options.found_inf,    options.maximize, options.decoupled_weight_decay};
}

// One Adam/AdamW step over `count` tensors of any dtypes: one group of launches per dtype.
// Refuses (false) device betas without device steps (betas_usable).
template <typename Launcher>
bool run_adam(const AdamTensor* tensors, int64_t count, const AdamOptions& options,
              Launcher& launcher) {
  if (!betas_usable(options)) return false;
  const AdamArgs args = make_adam_args(options);
  for (const DType dtype : kAllDTypes) {
    if (!contains_dtype(tensors, count, dtype)) continue;
    AdamGroup<Launcher> group{tensors, count, dtype, options, args, launcher};
    if (!with_storage_type(dtype, group)) return false;
  }
  return true;
}

}  // namespace cuda
}  // namespace fused_opt
