// The neonbf16 variant of the kernels: the neon ones, with bf16 stored by FEAT_BF16's conversion
// instruction (see Lanes<bf16> in simd_neon.h). setup.py compiles this file with its own ISA
// flags (see cpu_extension()); nothing here is shared with other translation units except the
// kernel table, and everything else lives in namespace fused_opt_cpu::neonbf16.
#include <arm_neon.h>

#include "kernel_api.h"

namespace fused_opt_cpu {
namespace neonbf16 {
// clang-format off: the kernels are written with the vectors of simd_neon.h
#include "simd_neon.h"
#include "optim_kernels.h"
// clang-format on
}  // namespace neonbf16

extern const KernelTable kNeonBf16Kernels = neonbf16::make_table("neonbf16");

}  // namespace fused_opt_cpu
