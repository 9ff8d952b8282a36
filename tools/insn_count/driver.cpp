// One kernel call of one SIMD variant on n elements, for tools/insn_count.py, which runs it
// under qemu and counts the guest instructions executed: the kernels (kernel_api.h) need no
// torch, so this program links kernels_<isa>.o alone.
//
//   driver <adamw|sgd|none> <fp32|bf16|fp16> <n>   (none: all but the call, to subtract)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../../csrc/cpu/kernel_api.h"

using namespace fused_opt_cpu;

// The variant's table (kernel_api.h declares it under FUSED_OPT_HAVE_<VARIANT>).
const KernelTable& kTable = VARIANT_TABLE;

namespace {

// n elements of dtype holding `value` (fp32 1.0 is 0x3f800000; bf16 and fp16 take its
// top half or the fp16 encoding).
std::vector<unsigned char> filled(int dtype, int64_t n, float value) {
  const size_t size = dtype == kFloat32 ? 4 : 2;
  std::vector<unsigned char> out(n * size);
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  for (int64_t i = 0; i < n; ++i) {
    if (dtype == kFloat32) {
      std::memcpy(&out[i * 4], &bits, 4);
    } else {
      // bf16: the top half. fp16: 0.5 -> 0x3800, 0.25 -> 0x3400, exact for these values.
      const uint16_t h =
          dtype == kBFloat16 ? uint16_t(bits >> 16) : uint16_t(value == 0.5f ? 0x3800 : 0x3400);
      std::memcpy(&out[i * 2], &h, 2);
    }
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s <adamw|sgd|none> <fp32|bf16|fp16> <n>\n", argv[0]);
    return 2;
  }
  const bool adam = std::strcmp(argv[1], "adamw") == 0;
  const int dtype = std::strcmp(argv[2], "bf16") == 0   ? kBFloat16
                    : std::strcmp(argv[2], "fp16") == 0 ? kFloat16
                                                        : kFloat32;
  const int64_t n = std::atoll(argv[3]);
  auto param = filled(dtype, n, 0.5f), grad = filled(dtype, n, 0.25f);
  auto state1 = filled(dtype, n, 0.25f), state2 = filled(dtype, n, 0.25f);
  if (adam) {
    AdamConsts k{1.0, 1.0, 0.01, 1 - 1e-3 * 0.01, 0.1, 0.999, 0.001, 1e-8, false};
    AdamTensor t{param.data(), grad.data(), state1.data(), state2.data(), nullptr, 0, n,
                 -1e-3 / 0.1,  0.0316,      nullptr};
    t.kernel = kTable.adam[dtype][0][kDecoupledDecay][0];
    t.kernel(t, 0, n, k, nullptr);
  } else if (std::strcmp(argv[1], "sgd") == 0) {
    SgdConsts k{1.0, 1.0, 0.0, 0.9, 1.0, -1e-3, false, false, false};
    SgdTensor t{param.data(), grad.data(), state1.data(), 0, n, nullptr};
    t.kernel = kTable.sgd[dtype][0][1];
    t.kernel(t, 0, n, k, nullptr);
  }
  // A result is used, so the call cannot be left out.
  std::printf("%s %s %s %lld %u\n", kTable.name, argv[1], argv[2], static_cast<long long>(n),
              unsigned(param[param.size() / 2]));
  return 0;
}
