// SGD with momentum, dampening, Nesterov, weight decay and maximize over multi_tensor_apply.
#include "fused_kernels.h"
#include "multi_tensor_apply.cuh"
#include "op_common.cuh"
#include "optimizer_math.cuh"

namespace fused_opt {
namespace cuda {
namespace {

struct SgdArgs {
  LearningRate lr;
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

  __device__ SgdOp(const Args& a, const PerTensor&)
      : s(math::make_sgd_scalars<Compute>(load_learning_rate(a.lr), a.weight_decay, a.momentum,
                                          a.dampening, a.nesterov, a.maximize, a.is_first_step,
                                          a.grad_scale != nullptr,
                                          a.grad_scale != nullptr ? *a.grad_scale : 1.0f)) {}

  __device__ __forceinline__ void operator()(Compute (&x)[kLists]) const {
    if constexpr (kMomentum) {
      math::sgd_update(x[0], x[1], x[2], s);
    } else {
      Compute no_buffer = Compute(0);
      math::sgd_update(x[0], x[1], no_buffer, s);
    }
  }
};

template <typename T, bool kMomentum>
cudaError_t launch_sgd_group(const SgdTensor* tensors, int64_t count, DType dtype,
                             const SgdArgs& args, cudaStream_t stream) {
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
  return launch_multi_tensor<Op>(count, describe, args, stream);
}

template <typename T>
struct SgdLauncher {
  static cudaError_t run(const SgdTensor* tensors, int64_t count, DType dtype, bool momentum,
                         const SgdArgs& args, cudaStream_t stream) {
    return momentum ? launch_sgd_group<T, true>(tensors, count, dtype, args, stream)
                    : launch_sgd_group<T, false>(tensors, count, dtype, args, stream);
  }
};

}  // namespace

cudaError_t launch_sgd(const SgdTensor* tensors, int64_t count, const SgdOptions& options,
                       cudaStream_t stream) {
  const SgdArgs args{options.lr,        options.weight_decay, options.momentum,
                     options.dampening, options.grad_scale,   options.found_inf,
                     options.nesterov,  options.maximize,     options.is_first_step};
  const bool momentum = options.momentum != 0.0;
  for (const DType dtype : kAllDTypes) {
    if (!contains_dtype(tensors, count, dtype)) continue;
    const cudaError_t error =
        dispatch_dtype<SgdLauncher>(dtype, tensors, count, dtype, momentum, args, stream);
    if (error != cudaSuccess) return error;
  }
  return cudaSuccess;
}

int max_tensors_per_launch_sgd(bool momentum) {
  return momentum ? TensorTable<3, NoPerTensorData>::kMaxTensors
                  : TensorTable<2, NoPerTensorData>::kMaxTensors;
}

}  // namespace cuda
}  // namespace fused_opt
