// SGD with momentum, dampening, Nesterov, weight decay and maximize: the GPU launches.
#include "fused_kernels.h"
#include "multi_tensor_apply.cuh"
#include "sgd_op.cuh"

namespace fused_opt {
namespace cuda {

cudaError_t launch_sgd(const SgdTensor* tensors, int64_t count, const SgdOptions& options,
                       cudaStream_t stream) {
  GpuLauncher launcher{stream};
  return launcher.result(run_sgd(tensors, count, options, launcher));
}

int max_tensors_per_launch_sgd(bool momentum) {
  return momentum ? TensorTable<3, NoPerTensorData>::kMaxTensors
                  : TensorTable<2, NoPerTensorData>::kMaxTensors;
}

}  // namespace cuda
}  // namespace fused_opt
