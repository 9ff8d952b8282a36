// The avx512 variant of the kernels. setup.py compiles this file with its own ISA flags
// (see cpu_extension()); nothing here is shared with other translation units except the
// kernel table, and everything else lives in namespace fused_opt_cpu::avx512.
#include <immintrin.h>

#include "kernel_api.h"

namespace fused_opt_cpu {
namespace avx512 {
// clang-format off: the kernels are written with the vectors of simd_avx512.h
#include "simd_avx512.h"
#include "optim_kernels.h"
// clang-format on
}  // namespace avx512

extern const KernelTable kAvx512Kernels = avx512::make_table("avx512");

}  // namespace fused_opt_cpu
