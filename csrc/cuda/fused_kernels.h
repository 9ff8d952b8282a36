// The host interface of the CUDA kernels: raw pointers, sizes, scalars and a stream.
//
// No torch here, so the kernels compile on machines whose torch has no CUDA headers; the torch
// glue (ops_cuda.cpp) validates tensors, fills these structs and calls the launchers. Every
// launcher groups the tensors by dtype, packs as many tensors as fit into each launch's kernel
// arguments, checks every launch and returns the first error (cudaSuccess otherwise).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernel_types.h"

namespace fused_opt {
namespace cuda {

cudaError_t launch_sgd(const SgdTensor* tensors, int64_t count, const SgdOptions& options,
                       cudaStream_t stream);

cudaError_t launch_adam(const AdamTensor* tensors, int64_t count, const AdamOptions& options,
                        cudaStream_t stream);

// Adds 1 to each device step counter (all fp32, or all fp64) unless *found_inf != 0: capturable
// Adam, after launch_adam.
cudaError_t launch_increment_steps(void* const* steps, int64_t count, bool is_double,
                                   const float* found_inf, cudaStream_t stream);

// Whether this binary holds code the current device can run (SASS for its arch, or PTX it can
// JIT): cudaSuccess, else the error a launch would meet (cudaErrorNoKernelImageForDevice, ...).
// Every kernel is compiled for the same archs, so one kernel answers for all. Clears the error.
cudaError_t kernel_image_status();

// How many tensors of each kind one launch carries (for the docs and the launch-count test).
int max_tensors_per_launch_sgd(bool momentum);
int max_tensors_per_launch_adam(bool amsgrad, bool capturable);

}  // namespace cuda
}  // namespace fused_opt
