// The host interface of the CUDA kernels: raw pointers, sizes, scalars and a stream.
//
// No torch here, so the kernels compile on machines whose torch has no CUDA headers; the torch
// glue (ops_cuda.cpp) validates tensors, fills these structs and calls the launchers. Every
// launcher groups the tensors by dtype, packs as many tensors as fit into each launch's kernel
// arguments, checks every launch and returns the first error (cudaSuccess otherwise).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fused_opt {
namespace cuda {

enum class DType : int { kFloat32, kFloat64, kFloat16, kBFloat16 };

// The learning rate: `value`, or read on the device from a 1-element fp32/fp64 tensor.
struct LearningRate {
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
  LearningRate lr;
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
  LearningRate lr;
  double beta1;
  double beta2;
  double weight_decay;
  double eps;
  bool amsgrad;
  bool maximize;
  bool decoupled_weight_decay;
  bool capturable;  // steps on the device (AdamTensor::device_step), none on the host
  const float* grad_scale;
  const float* found_inf;
};

cudaError_t launch_sgd(const SgdTensor* tensors, int64_t count, const SgdOptions& options,
                       cudaStream_t stream);

cudaError_t launch_adam(const AdamTensor* tensors, int64_t count, const AdamOptions& options,
                        cudaStream_t stream);

// Adds 1 to each device step counter (all fp32, or all fp64) unless *found_inf != 0: capturable
// Adam, after launch_adam.
cudaError_t launch_increment_steps(void* const* steps, int64_t count, bool is_double,
                                   const float* found_inf, cudaStream_t stream);

// How many tensors of each kind one launch carries (for the docs and the launch-count test).
int max_tensors_per_launch_sgd(bool momentum);
int max_tensors_per_launch_adam(bool amsgrad, bool capturable);

}  // namespace cuda
}  // namespace fused_opt
