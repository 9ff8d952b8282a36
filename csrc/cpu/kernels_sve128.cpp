// The sve128 variant of the kernels: SVE with 128-bit vectors, run only on a CPU whose vector
// length is 128 bits (isa.cpp). setup.py compiles this file with its own ISA flags, among them
// -msve-vector-bits=128 (see cpu_extension()); nothing here is shared with other translation
// units except the kernel table, and everything else lives in namespace fused_opt_cpu::sve128.
#include <arm_sve.h>

#include "kernel_api.h"

#if __ARM_FEATURE_SVE_BITS != 128
#error "kernels_sve128.cpp needs -msve-vector-bits=128"
#endif

namespace fused_opt_cpu {
namespace sve128 {
// clang-format off: the kernels are written with the vectors of simd_sve.h
#include "simd_sve.h"
#include "optim_kernels.h"
// clang-format on
}  // namespace sve128

extern const KernelTable kSve128Kernels = sve128::make_table("sve128");

}  // namespace fused_opt_cpu
