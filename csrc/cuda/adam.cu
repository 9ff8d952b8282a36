// Adam / AdamW (amsgrad, maximize, L2 or decoupled weight decay): the GPU launches, and the
// step-counter increment of capturable calls.
#include "adam_op.cuh"
#include "fused_kernels.h"
#include "multi_tensor_apply.cuh"

namespace fused_opt {
namespace cuda {
namespace {

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
  GpuLauncher launcher{stream};
  return launcher.result(run_adam(tensors, count, options, launcher));
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

cudaError_t kernel_image_status() {
  cudaFuncAttributes attributes;
  const cudaError_t status = cudaFuncGetAttributes(&attributes, increment_steps_kernel<float>);
  if (status != cudaSuccess) (void)cudaGetLastError();  // not sticky: leave no trace of it
  return status;
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
