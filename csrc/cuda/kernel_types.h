// The plain descriptions the launchers take: dtypes, pointers, sizes and hyper-parameters.
//
// Plain C++ (no CUDA, no torch), shared by the torch glue, the kernels and the host harness.
#pragma once

#include <cstdint>

namespace fused_opt {
namespace cuda {

enum class DType : int { kFloat32, kFloat64, kFloat16, kBFloat16 };

// A hyper-parameter (lr, an Adam beta or weight decay): `value`, or read by the kernels from a
// 1-element fp32/fp64 tensor on the device, never by the host (a step stays graph-capturable).
struct HyperParam {
  double value = 0.0;
  const void* device_ptr = nullptr;
  bool device_is_double = false;
};

struct SgdTensor {
  DType dtype;
  int64_t numel;
  void* param;
  const void* grad;
  void* momentum_buffer;  // null when momentum == 0
};

struct SgdOptions {
  HyperParam lr;
  double weight_decay;
  double momentum;
  double dampening;
  bool nesterov;
  bool maximize;
  bool is_first_step;
  const float* grad_scale;  // device scalars or null
  const float* found_inf;
};

struct AdamTensor {
  DType dtype;
  int64_t numel;
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // null unless amsgrad
  // Non-capturable: the step count after this step's increment (read on the host).
  double step;
  // Capturable: the device step counter (fp32, or fp64 when that is torch's default dtype), read
  // (+1) by the kernel; launch_increment_steps then adds 1.
  const void* device_step;
  bool device_step_is_double;
};

struct AdamOptions {
  HyperParam lr;
  HyperParam beta1;  // on the device only when capturable: the host computes the bias
  HyperParam beta2;  // corrections of a non-capturable step
  HyperParam weight_decay;
  double eps;
  bool amsgrad;
  bool maximize;
  bool decoupled_weight_decay;
  bool capturable;  // steps on the device (AdamTensor::device_step), none on the host
  const float* grad_scale;
  const float* found_inf;
};

// Device betas need device steps: a non-capturable step's bias corrections are host arithmetic.
inline bool betas_usable(const AdamOptions& options) {
  return options.capturable ||
         (options.beta1.device_ptr == nullptr && options.beta2.device_ptr == nullptr);
}

}  // namespace cuda
}  // namespace fused_opt
