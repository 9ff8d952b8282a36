// Which SIMD variant of the kernels runs: what was compiled, what this CPU can run, and the
// choice (best supported by default; FUSED_OPT_CPU_ISA or set_isa() can pick a lower one).
#pragma once

#include "kernel_api.h"

namespace fused_opt_cpu {

// Compiled variants, lowest first: "baseline", then "avx2", "avx512", "avx512bf16" on x86-64 and
// "neon", "sve128", "neonbf16", "sve256" on aarch64, those that were built.
int compiled_isa_count();
const char* compiled_isa_name(int index);
bool isa_runs_here(int index);

// Makes `requested` (a variant name, or null / "" for the best one) the active variant. When
// this CPU cannot run it or it is unknown, the best supported variant is chosen instead and a
// message saying so is returned; otherwise returns null.
const char* select_isa(const char* requested);

// The kernels in use (chosen on first use if select_isa() was never called).
const KernelTable& active_kernels();

}  // namespace fused_opt_cpu
