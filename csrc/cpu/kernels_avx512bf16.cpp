// The avx512bf16 variant of the kernels: the avx512 ones, with bf16 stored by AVX512_BF16's
// conversion instruction (see Lanes<bf16> in simd_avx512.h). setup.py compiles this file with
// its own ISA flags (see cpu_extension()); nothing here is shared with other translation units
// except the kernel table, and everything else lives in namespace fused_opt_cpu::avx512bf16.
#include <immintrin.h>

#include "kernel_api.h"

namespace fused_opt_cpu {
namespace avx512bf16 {
// clang-format off: the kernels are written with the vectors of simd_avx512.h
#include "simd_avx512.h"
#include "optim_kernels.h"
// clang-format on
}  // namespace avx512bf16

extern const KernelTable kAvx512Bf16Kernels = avx512bf16::make_table("avx512bf16");

}  // namespace fused_opt_cpu
