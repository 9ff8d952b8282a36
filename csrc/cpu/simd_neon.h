// AArch64 Advanced SIMD (NEON) vectors for the kernels: 4 floats or 2 doubles per register.
// Every AArch64 CPU has them, fp16 conversions and FMA included. The neonbf16 variant (built
// with +bf16, FEAT_BF16) stores bf16 with the conversion instruction instead of integer rounding.
// Included inside namespace fused_opt_cpu::neon or ::neonbf16, after <arm_neon.h>.

struct VF {
  float32x4_t v;
};
struct VD {
  float64x2_t v;
};

inline VF operator+(VF a, VF b) { return {vaddq_f32(a.v, b.v)}; }
inline VF operator-(VF a, VF b) { return {vsubq_f32(a.v, b.v)}; }
inline VF operator*(VF a, VF b) { return {vmulq_f32(a.v, b.v)}; }
inline VF operator/(VF a, VF b) { return {vdivq_f32(a.v, b.v)}; }
// a*b+c and a*b-c with one rounding; a*b + (-c) gives a*b - c's signed zeros (vfms would not).
inline VF fmadd(VF a, VF b, VF c) { return {vfmaq_f32(c.v, a.v, b.v)}; }
inline VF fmsub(VF a, VF b, VF c) { return {vfmaq_f32(vnegq_f32(c.v), a.v, b.v)}; }
inline VF vsqrt(VF a) { return {vsqrtq_f32(a.v)}; }
// torch.maximum, as the other variants compute it: a where a > b or a is NaN, else b (FMAX
// would pick +0 over -0 and another NaN payload).
inline VF max_nan(VF a, VF b) {
  const uint32x4_t take_a = vorrq_u32(vcgtq_f32(a.v, b.v), vmvnq_u32(vceqq_f32(a.v, a.v)));
  return {vbslq_f32(take_a, a.v, b.v)};
}
// x, or `fallback` in the lanes where x is NaN
inline VF nan_to(VF x, VF fallback) { return {vbslq_f32(vceqq_f32(x.v, x.v), x.v, fallback.v)}; }

inline VD operator+(VD a, VD b) { return {vaddq_f64(a.v, b.v)}; }
inline VD operator-(VD a, VD b) { return {vsubq_f64(a.v, b.v)}; }
inline VD operator*(VD a, VD b) { return {vmulq_f64(a.v, b.v)}; }
inline VD operator/(VD a, VD b) { return {vdivq_f64(a.v, b.v)}; }
inline VD fmadd(VD a, VD b, VD c) { return {vfmaq_f64(c.v, a.v, b.v)}; }
inline VD fmsub(VD a, VD b, VD c) { return {vfmaq_f64(vnegq_f64(c.v), a.v, b.v)}; }
inline VD vsqrt(VD a) { return {vsqrtq_f64(a.v)}; }
inline VD max_nan(VD a, VD b) {
  const uint64x2_t a_is_nan =
      vreinterpretq_u64_u32(vmvnq_u32(vreinterpretq_u32_u64(vceqq_f64(a.v, a.v))));
  return {vbslq_f64(vorrq_u64(vcgtq_f64(a.v, b.v), a_is_nan), a.v, b.v)};
}
inline VD nan_to(VD x, VD fallback) { return {vbslq_f64(vceqq_f64(x.v, x.v), x.v, fallback.v)}; }

template <typename S>
struct Lanes;

#include "simd_pair.h"

// fp32 also goes two registers at a time (LDP / STP): a loop iteration's pointer updates,
// compare and branch are then paid once per 8 values (AdamW fp32: 7.56 -> 6.56 instructions per
// element, SGD with momentum 5.50 -> 4.00).
template <>
struct Lanes<float> {
  using Vec = Pair<VF>;
  using Scalar = float;
  static constexpr int kWidth = 8;
  static Vec splat(float x) { return {VF{vdupq_n_f32(x)}, VF{vdupq_n_f32(x)}}; }
  static Vec load(const float* p) { return {VF{vld1q_f32(p)}, VF{vld1q_f32(p + 4)}}; }
  static void store(float* p, Vec x) {
    vst1q_f32(p, x.lo.v);
    vst1q_f32(p + 4, x.hi.v);
  }
};

template <>
struct Lanes<double> {
  using Vec = VD;
  using Scalar = double;
  static constexpr int kWidth = 2;
  static Vec splat(double x) { return {vdupq_n_f64(x)}; }
  static Vec load(const double* p) { return {vld1q_f64(p)}; }
  static void store(double* p, Vec x) { vst1q_f64(p, x.v); }
};

// bf16 is the top half of an fp32: one 16-byte load of 8 values is widened into elements 0-3
// (`lo`) and 4-7 (`hi`) by shifting each value up into its own 32-bit lane.
template <>
struct Lanes<bf16> {
  using Vec = Pair<VF>;
  using Scalar = float;
  static constexpr int kWidth = 8;
  static Vec splat(float x) { return {VF{vdupq_n_f32(x)}, VF{vdupq_n_f32(x)}}; }
  static Vec load(const bf16* p) {
    const uint16x8_t x = vld1q_u16(reinterpret_cast<const uint16_t*>(p));
    return {VF{vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(x), 16))},
            VF{vreinterpretq_f32_u32(vshll_high_n_u16(x, 16))}};
  }
#if defined(__ARM_FEATURE_BF16_VECTOR_ARITHMETIC)
  // BFCVTN rounds to nearest even (FPCR's mode, which Linux leaves at nearest) and keeps
  // subnormals (FPCR.FZ is off); NaN stays a quiet NaN with its payload's top bits.
  static void store(bf16* p, Vec x) {
    const bfloat16x8_t out = vcvtq_high_bf16_f32(vcvtq_low_bf16_f32(x.lo.v), x.hi.v);
    vst1q_u16(reinterpret_cast<uint16_t*>(p), vreinterpretq_u16_bf16(out));
  }
#else
  // Round to nearest even on 16-bit lanes, as the AVX2 variant does (simd_avx2.h): `top` holds
  // the truncated bf16 values and `rest` the lower halves, both in memory order (one unzip
  // each); a value rounds up when rest >= 0x8001 - (top & 1). A NaN keeps its top half, payload
  // and all: its lower half is zero (simd_avx2.h says why). 6 operations for 8 values.
  static void store(bf16* p, Vec x) {
    const uint16x8_t lo = vreinterpretq_u16_f32(x.lo.v), hi = vreinterpretq_u16_f32(x.hi.v);
    const uint16x8_t top = vuzp2q_u16(lo, hi), rest = vuzp1q_u16(lo, hi);
    const uint16x8_t threshold = vsubq_u16(vdupq_n_u16(0x8001), vandq_u16(top, vdupq_n_u16(1)));
    const uint16x8_t rounded = vsubq_u16(top, vcgeq_u16(rest, threshold));  // true is 0xFFFF
    vst1q_u16(reinterpret_cast<uint16_t*>(p), rounded);
  }
#endif
};

// fp16 <-> fp32 by FCVTL / FCVTN: round to nearest even, subnormals kept (FPCR.FZ16 is off).
template <>
struct Lanes<half> {
  using Vec = Pair<VF>;
  using Scalar = float;
  static constexpr int kWidth = 8;
  static Vec splat(float x) { return {VF{vdupq_n_f32(x)}, VF{vdupq_n_f32(x)}}; }
  static Vec load(const half* p) {
    const float16x8_t x = vreinterpretq_f16_u16(vld1q_u16(reinterpret_cast<const uint16_t*>(p)));
    return {VF{vcvt_f32_f16(vget_low_f16(x))}, VF{vcvt_high_f32_f16(x)}};
  }
  static void store(half* p, Vec x) {
    const float16x8_t out = vcvt_high_f16_f32(vcvt_f16_f32(x.lo.v), x.hi.v);
    vst1q_u16(reinterpret_cast<uint16_t*>(p), vreinterpretq_u16_f16(out));
  }
};
