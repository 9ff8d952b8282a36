// Pieces every optimizer's launcher shares: the hyper-parameter read and the dtype grouping.
#pragma once

#include <cstdint>

#include "kernel_types.h"
#include "multi_tensor_apply.cuh"

namespace fused_opt {
namespace cuda {

// A device hyper-parameter is read by every block, never synchronised to the host (graph-safe).
FUSED_OPT_HOST_DEVICE double load_hyper(const HyperParam& h) {
  if (h.device_ptr == nullptr) return h.value;
  return h.device_is_double ? *static_cast<const double*>(h.device_ptr)
                            : static_cast<double>(*static_cast<const float*>(h.device_ptr));
}

// The dtypes of a call, in a fixed order: one group of launches per dtype present.
constexpr DType kAllDTypes[] = {DType::kFloat32, DType::kFloat64, DType::kFloat16,
                                DType::kBFloat16};

template <typename TensorDesc>
bool contains_dtype(const TensorDesc* tensors, int64_t count, DType dtype) {
  for (int64_t i = 0; i < count; ++i)
    if (tensors[i].dtype == dtype) return true;
  return false;
}

// Calls group.template run<T>() with the storage type of `dtype`; fp16/bf16 exist only in device
// builds (a host build returns false for them).
template <typename Group>
bool with_storage_type(DType dtype, Group& group) {
  switch (dtype) {
    case DType::kFloat32: return group.template run<float>();
    case DType::kFloat64: return group.template run<double>();
#if defined(__CUDACC__)
    case DType::kFloat16: return group.template run<__half>();
    case DType::kBFloat16: return group.template run<__nv_bfloat16>();
#endif
    default: return false;
  }
}

}  // namespace cuda
}  // namespace fused_opt
