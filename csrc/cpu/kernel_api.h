// The contract between the torch glue (ops.cpp) and the SIMD kernels (kernels_<isa>.cpp).
//
// Torch-free on purpose: the ISA translation units are compiled with -mavx2, -march=armv8.2-a+sve
// and the like, and must not instantiate any inline or template code that other translation
// units also instantiate (an ODR violation could let AVX-512 code leak into the baseline path).
// They see only this header, their intrinsics header and their own namespaced code: raw
// pointers, sizes and plain numbers.
#pragma once

#include <stdint.h>

namespace fused_opt_cpu {

// Storage types of the tensors (layout-compatible with c10::BFloat16 / c10::Half).
struct bf16 {
  uint16_t bits;
};
struct half {
  uint16_t bits;
};

enum DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3, kNumDTypes = 4 };

// Weight decay flavour of Adam: none, L2 (added to the gradient), decoupled (AdamW).
enum Decay : int { kNoDecay = 0, kL2Decay = 1, kDecoupledDecay = 2, kNumDecays = 3 };

// ---- SGD -------------------------------------------------------------------------------------
// Call-wide constants, in double; each kernel rounds them to its compute type once, as torch
// rounds a Python scalar to the tensor's op-math type.
struct SgdConsts {
  double grad_divisor;  // grad_scale (negated when maximize); used when the kernel is "scaled"
  double grad_sign;     // -1 when maximize, else 1; used when not scaled
  double weight_decay;
  double momentum;
  double one_minus_dampening;
  double neg_lr;
  bool maximize;
  bool nesterov;
  bool is_first_step;
};

// One tensor's memory: `numel` contiguous elements each (dense, identical strides). A kernel
// updates elements [begin, end) of `t`; `next` is the tensor the same thread runs after it (null
// if none), whose first lines a kernel on a short tensor loads meanwhile (optim_kernels.h).
struct SgdTensor;
using SgdFn = void (*)(const SgdTensor& t, int64_t begin, int64_t end, const SgdConsts& k,
                       const SgdTensor* next);

struct SgdTensor {
  void* param;
  const void* grad;
  void* momentum_buffer;  // null when momentum == 0
  int64_t start;          // offset of this tensor in the call's flat element space
  int64_t numel;
  SgdFn kernel;  // chosen for this tensor's dtype
};

// ---- Adam / AdamW ----------------------------------------------------------------------------
struct AdamConsts {
  double grad_divisor;
  double grad_sign;
  double weight_decay;
  double decay_factor;  // 1 - lr * weight_decay (decoupled)
  double lerp_weight;   // 1 - beta1
  double beta2;
  double one_minus_beta2;
  double eps;
  bool maximize;
};

struct AdamTensor;
using AdamFn = void (*)(const AdamTensor& t, int64_t begin, int64_t end, const AdamConsts& k,
                        const AdamTensor* next);

struct AdamTensor {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // null unless amsgrad
  int64_t start;
  int64_t numel;
  double neg_step_size;          // -lr / (1 - beta1**step), this tensor's own step
  double bias_correction2_sqrt;  // (1 - beta2**step) ** 0.5
  AdamFn kernel;
};

// The most arrays a bandwidth pass reads: as many as Adam with amsgrad.
constexpr int kMaxPassStreams = 5;

// ---- one SIMD variant ------------------------------------------------------------------------
// Indexed by [dtype][grad_scale given][...]: the flags that change the inner loop most are
// template parameters; the rest are uniform branches inside the loop.
struct KernelTable {
  const char* name;
  SgdFn sgd[kNumDTypes][2 /*scaled*/][2 /*momentum*/];
  AdamFn adam[kNumDTypes][2 /*scaled*/][kNumDecays][2 /*amsgrad*/];
  // out[i] = x[i] / c as the 16-bit Adam kernels divide by bias_correction2_sqrt, so that the
  // tests can compare every fp32 significand with a division.
  void (*divide_by_constant)(const float* x, float* out, int64_t n, float c);
  // The bandwidth floor's pass over `streams` (1 to kMaxPassStreams) fp32 arrays of n elements,
  // shaped like a step: every array read, all but the second written back (optim_kernels.h).
  void (*stream_pass)(float* const* arrays, int streams, int64_t n, float zero);
};

extern const KernelTable kBaselineKernels;
#if defined(FUSED_OPT_HAVE_AVX2)
extern const KernelTable kAvx2Kernels;
#endif
#if defined(FUSED_OPT_HAVE_AVX512)
extern const KernelTable kAvx512Kernels;
#endif
#if defined(FUSED_OPT_HAVE_AVX512BF16)
extern const KernelTable kAvx512Bf16Kernels;
#endif
#if defined(FUSED_OPT_HAVE_NEON)
extern const KernelTable kNeonKernels;
#endif
#if defined(FUSED_OPT_HAVE_NEONBF16)
extern const KernelTable kNeonBf16Kernels;
#endif
#if defined(FUSED_OPT_HAVE_SVE128)
extern const KernelTable kSve128Kernels;
#endif
#if defined(FUSED_OPT_HAVE_SVE256)
extern const KernelTable kSve256Kernels;
#endif

}  // namespace fused_opt_cpu
