// The sve256 variant of the kernels: SVE with 256-bit vectors, run only on a CPU whose vector
// length is 256 bits (isa.cpp). setup.py compiles this file with its own ISA flags, among them
// -msve-vector-bits=256 (see cpu_extension()); nothing here is shared with other translation
// units except the kernel table, and everything else lives in namespace fused_opt_cpu::sve256.
#include <arm_sve.h>

#include "kernel_api.h"

#if __ARM_FEATURE_SVE_BITS != 256
#error "kernels_sve256.cpp needs -msve-vector-bits=256"
#endif

namespace fused_opt_cpu {
namespace sve256 {
// clang-format off: the kernels are written with the vectors of simd_sve.h
#include "simd_sve.h"
#include "optim_kernels.h"
// clang-format on
}  // namespace sve256

extern const KernelTable kSve256Kernels = sve256::make_table("sve256");

}  // namespace fused_opt_cpu
