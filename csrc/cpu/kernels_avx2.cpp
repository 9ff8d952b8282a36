// The avx2 variant of the kernels. setup.py compiles this file with its own ISA flags
// (see cpu_extension()); nothing here is shared with other translation units except the
// kernel table, and everything else lives in namespace fused_opt_cpu::avx2.
#include <immintrin.h>

#include "kernel_api.h"

namespace fused_opt_cpu {
namespace avx2 {
// clang-format off: the kernels are written with the vectors of simd_avx2.h
#include "simd_avx2.h"
#include "optim_kernels.h"
// clang-format on
}  // namespace avx2

extern const KernelTable kAvx2Kernels = avx2::make_table("avx2");

}  // namespace fused_opt_cpu
