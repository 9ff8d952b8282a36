#include "isa.h"

#include <atomic>
#include <cstdio>
#include <cstring>

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#include <sys/prctl.h>
#endif

namespace fused_opt_cpu {
namespace {

bool always() { return true; }

#if defined(FUSED_OPT_HAVE_AVX2) || defined(FUSED_OPT_HAVE_AVX512) || \
    defined(FUSED_OPT_HAVE_AVX512BF16)
// __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 register state.
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
#endif
#if defined(FUSED_OPT_HAVE_AVX512) || defined(FUSED_OPT_HAVE_AVX512BF16)
bool cpu_has_avx512() {
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq");
}
#endif
#if defined(FUSED_OPT_HAVE_AVX512BF16)
bool cpu_has_avx512bf16() { return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16"); }
#endif

#if defined(__aarch64__) && defined(__linux__)
// What Linux says the CPU has (HWCAP bits, as in <asm/hwcap.h>; spelled out for older headers).
constexpr unsigned long kHwcapAsimd = 1ul << 1, kHwcapSve = 1ul << 22;
constexpr unsigned long kHwcap2SveBf16 = 1ul << 12, kHwcap2Bf16 = 1ul << 14;

[[maybe_unused]] bool cpu_has_neon() { return getauxval(AT_HWCAP) & kHwcapAsimd; }
// FEAT_BF16: BFCVTN, the one-instruction fp32 -> bf16 narrowing (Neoverse V1/N2/V2 on, not N1).
[[maybe_unused]] bool cpu_has_neonbf16() {
  return cpu_has_neon() && (getauxval(AT_HWCAP2) & kHwcap2Bf16);
}
// SVE with its bf16 conversion, at the vector length this thread runs with (a fixed-length
// variant is only right at its own length; Linux lets a process lower its length, prctl says).
[[maybe_unused]] int sve_bf16_bits() {
  if (!(getauxval(AT_HWCAP) & kHwcapSve) || !(getauxval(AT_HWCAP2) & kHwcap2SveBf16) ||
      !cpu_has_neonbf16())
    return 0;
  const int vl = prctl(PR_SVE_GET_VL, 0, 0, 0, 0);
  return vl < 0 ? 0 : (vl & PR_SVE_VL_LEN_MASK) * 8;
}
#endif
#if defined(FUSED_OPT_HAVE_SVE128)
bool cpu_has_sve128() { return sve_bf16_bits() == 128; }
#endif
#if defined(FUSED_OPT_HAVE_SVE256)
bool cpu_has_sve256() { return sve_bf16_bits() == 256; }
#endif

struct Variant {
  const char* name;
  const KernelTable* kernels;
  bool (*runs_here)();
};

const Variant kVariants[] = {
    {"baseline", &kBaselineKernels, always},
#if defined(FUSED_OPT_HAVE_AVX2)
    {"avx2", &kAvx2Kernels, cpu_has_avx2},
#endif
#if defined(FUSED_OPT_HAVE_AVX512)
    {"avx512", &kAvx512Kernels, cpu_has_avx512},
#endif
#if defined(FUSED_OPT_HAVE_AVX512BF16)
    {"avx512bf16", &kAvx512Bf16Kernels, cpu_has_avx512bf16},
#endif
#if defined(FUSED_OPT_HAVE_NEON)
    {"neon", &kNeonKernels, cpu_has_neon},
#endif
// sve128 before neonbf16, which every CPU with sve128 has: at 128 bits NEON's kernels take fewer
// instructions per element in most cases (docs/CPU_KERNELS.md), so sve128 runs when asked for.
#if defined(FUSED_OPT_HAVE_SVE128)
    {"sve128", &kSve128Kernels, cpu_has_sve128},
#endif
#if defined(FUSED_OPT_HAVE_NEONBF16)
    {"neonbf16", &kNeonBf16Kernels, cpu_has_neonbf16},
#endif
#if defined(FUSED_OPT_HAVE_SVE256)
    {"sve256", &kSve256Kernels, cpu_has_sve256},
#endif
};
constexpr int kNumVariants = sizeof(kVariants) / sizeof(kVariants[0]);

std::atomic<const KernelTable*> g_active{nullptr};

int best_supported() {
  int best = 0;
  for (int i = 0; i < kNumVariants; ++i)
    if (kVariants[i].runs_here()) best = i;
  return best;
}

}  // namespace

int compiled_isa_count() { return kNumVariants; }
const char* compiled_isa_name(int index) { return kVariants[index].name; }
bool isa_runs_here(int index) { return kVariants[index].runs_here(); }

const char* select_isa(const char* requested) {
  static char message[256];
  const int best = best_supported();
  if (requested == nullptr || requested[0] == '\0') {
    g_active.store(kVariants[best].kernels);
    return nullptr;
  }
  for (int i = 0; i < kNumVariants; ++i) {
    if (std::strcmp(kVariants[i].name, requested) != 0) continue;
    if (kVariants[i].runs_here()) {
      g_active.store(kVariants[i].kernels);
      return nullptr;
    }
    g_active.store(kVariants[best].kernels);
    std::snprintf(message, sizeof message,
                  "fused_opt: this CPU cannot run the %s kernels; using %s instead", requested,
                  kVariants[best].name);
    return message;
  }
  g_active.store(kVariants[best].kernels);
  char compiled[64] = "";
  for (int i = 0; i < kNumVariants; ++i) {
    if (i > 0) std::strncat(compiled, ", ", sizeof compiled - std::strlen(compiled) - 1);
    std::strncat(compiled, kVariants[i].name, sizeof compiled - std::strlen(compiled) - 1);
  }
  std::snprintf(message, sizeof message,
                "fused_opt: unknown CPU kernel variant %.40s (compiled: %s); using %s", requested,
                compiled, kVariants[best].name);
  return message;
}

const KernelTable& active_kernels() {
  const KernelTable* table = g_active.load(std::memory_order_relaxed);
  if (table == nullptr) {
    select_isa(nullptr);
    table = g_active.load();
  }
  return *table;
}

}  // namespace fused_opt_cpu
