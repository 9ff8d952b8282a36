// SGD over multi_tensor_apply: the op a thread applies and the launch planning of a call.
//
// Plain C++ for a host compiler too (see multi_tensor_apply.cuh): sgd.cu runs it with the GPU
// launcher, testing/host_harness.cpp with a host emulation of the launches.
#pragma once

#include <cstdint>

#include "kernel_types.h"
#include "multi_tensor_apply.cuh"
#include "op_common.cuh"
#include "optimizer_math.cuh"

namespace fused_opt {
namespace cuda {

struct SgdArgs {
  HyperParam lr;
  double weight_decay;
  double momentum;
  double dampening;
  const float* grad_scale;
  const float* found_inf;
  bool nesterov;
  bool maximize;
  bool is_first_step;
};

// Lists: 0 param, 1 grad (read only), 2 momentum buffer (only with momentum).
template <typename T, bool kMomentum>
struct SgdOp {
  using Storage = T;
  using Compute = typename ComputeTypeOf<T>::type;
  using Args = SgdArgs;
  using PerTensor = NoPerTensorData;
  static constexpr int kLists = kMomentum ? 3 : 2;
  static constexpr bool writes(int list) { return list != 1; }

  math::SgdScalars<Compute> s;

  FUSED_OPT_HOST_DEVICE SgdOp(const Args& a, const PerTensor&)
      : s(math::make_sgd_scalars<Compute>(load_hyper(a.lr), a.weight_decay, a.momentum, a.dampening,
                                          a.nesterov, a.maximize, a.is_first_step,
                                          a.grad_scale != nullptr,
                                          a.grad_scale != nullptr ? *a.grad_scale : 1.0f)) {}

  FUSED_OPT_HOST_DEVICE void operator()(Compute (&x)[kLists]) const {
    if constexpr (kMomentum) {
      math::sgd_update(x[0], x[1], x[2], s);
    } else {
      Compute no_buffer = Compute(0);
      math::sgd_update(x[0], x[1], no_buffer, s);
    }
  }
};

// The tensors of one dtype of a call, handed to the launcher table by table.
template <typename Launcher>
struct SgdGroup {
  const SgdTensor* tensors;
  int64_t count;
  DType dtype;
  const SgdArgs& args;
  Launcher& launcher;

  template <typename T>
  bool run() {
    return args.momentum != 0.0 ? run_lists<T, true>() : run_lists<T, false>();
  }

  template <typename T, bool kMomentum>
  bool run_lists() {
    using Op = SgdOp<T, kMomentum>;
    auto describe = [&](int64_t i, TensorSlot<Op::kLists, NoPerTensorData>& slot) {
      const SgdTensor& t = tensors[i];
      if (t.dtype != dtype) return false;
      slot.ptrs[0] = t.param;
      slot.ptrs[1] = const_cast<void*>(t.grad);  // never written: writes(1) is false
      if constexpr (kMomentum) slot.ptrs[2] = t.momentum_buffer;
      slot.numel = t.numel;
      return true;
    };
    return launch_multi_tensor<Op>(count, describe, args, launcher);
  }
};

inline SgdArgs make_sgd_args(const SgdOptions& options) {
  return SgdArgs{options.lr,        options.weight_decay, options.momentum,
                 options.dampening, options.grad_scale,   options.found_inf,
                 options.nesterov,  options.maximize,     options.is_first_step};
}

// One SGD step over `count` tensors of any dtypes: one group of launches per dtype.
template <typename Launcher>
bool run_sgd(const SgdTensor* tensors, int64_t count, const SgdOptions& options,
             Launcher& launcher) {
  const SgdArgs args = make_sgd_args(options);
  for (const DType dtype : kAllDTypes) {
    if (!contains_dtype(tensors, count, dtype)) continue;
    SgdGroup<Launcher> group{tensors, count, dtype, args, launcher};
    if (!with_storage_type(dtype, group)) return false;
  }
  return true;
}

}  // namespace cuda
}  // namespace fused_opt
