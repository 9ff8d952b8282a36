// Pieces every optimizer's launcher shares: the learning rate read and the dtype dispatch.
#pragma once

#include "fused_kernels.h"
#include "multi_tensor_apply.cuh"

namespace fused_opt {
namespace cuda {

// A device learning rate is read by every block, never synchronised to the host (graph-safe).
__device__ __forceinline__ double load_learning_rate(const LearningRate& lr) {
  if (lr.device_ptr == nullptr) return lr.value;
  return lr.device_is_double ? *static_cast<const double*>(lr.device_ptr)
                             : static_cast<double>(*static_cast<const float*>(lr.device_ptr));
}

// Returns Launcher<T>::run(args...) with T the storage type of `dtype` (C++17: no template
// lambdas, so the kernels also build where torch compiles extensions as C++17).
template <template <typename> class Launcher, typename... Args>
cudaError_t dispatch_dtype(DType dtype, Args&&... args) {
  switch (dtype) {
    case DType::kFloat32:
      return Launcher<float>::run(args...);
    case DType::kFloat64:
      return Launcher<double>::run(args...);
    case DType::kFloat16:
      return Launcher<__half>::run(args...);
    case DType::kBFloat16:
      return Launcher<__nv_bfloat16>::run(args...);
  }
  return cudaErrorInvalidValue;
}

// The dtypes present in a call, in a fixed order: one group of launches per dtype.
template <typename TensorDesc>
bool contains_dtype(const TensorDesc* tensors, int64_t count, DType dtype) {
  for (int64_t i = 0; i < count; ++i)
    if (tensors[i].dtype == dtype) return true;
  return false;
}

constexpr DType kAllDTypes[] = {DType::kFloat32, DType::kFloat64, DType::kFloat16,
                                DType::kBFloat16};

}  // namespace cuda
}  // namespace fused_opt
