// The baseline variant of the kernels. setup.py compiles this file with its own ISA flags
// (see cpu_extension()); nothing here is shared with other translation units except the
// kernel table, and everything else lives in namespace fused_opt_cpu::baseline.

#include "kernel_api.h"

namespace fused_opt_cpu {
namespace baseline {
// clang-format off: the kernels are written with the vectors of simd_baseline.h
#include "simd_baseline.h"
#include "optim_kernels.h"
// clang-format on
}  // namespace baseline

extern const KernelTable kBaselineKernels = baseline::make_table("baseline");

}  // namespace fused_opt_cpu
