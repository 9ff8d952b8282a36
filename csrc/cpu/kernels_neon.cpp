// The neon variant of the kernels (every AArch64 CPU). setup.py compiles this file with its own
// ISA flags (see cpu_extension()); nothing here is shared with other translation units except the
// kernel table, and everything else lives in namespace fused_opt_cpu::neon.
#include <arm_neon.h>

#include "kernel_api.h"

namespace fused_opt_cpu {
namespace neon {
// clang-format off: the kernels are written with the vectors of simd_neon.h
#include "simd_neon.h"
#include "optim_kernels.h"
// clang-format on
}  // namespace neon

extern const KernelTable kNeonKernels = neon::make_table("neon");

}  // namespace fused_opt_cpu
