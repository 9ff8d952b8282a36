// AVX2 + FMA + F16C vectors for the kernels: 8 floats or 4 doubles per register.
// Included inside namespace fused_opt_cpu::avx2 (see kernels_avx2.cpp), after <immintrin.h>.

struct VF {
  __m256 v;
};
struct VD {
  __m256d v;
};

inline VF operator+(VF a, VF b) { return {_mm256_add_ps(a.v, b.v)}; }
inline VF operator-(VF a, VF b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline VF operator*(VF a, VF b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline VF operator/(VF a, VF b) { return {_mm256_div_ps(a.v, b.v)}; }
// a*b+c with one rounding
inline VF fmadd(VF a, VF b, VF c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline VF fmsub(VF a, VF b, VF c) { return {_mm256_fmsub_ps(a.v, b.v, c.v)}; }  // a*b-c
inline VF vsqrt(VF a) { return {_mm256_sqrt_ps(a.v)}; }
// max that returns NaN when either input is NaN (torch.maximum); max_ps alone returns b then.
inline VF max_nan(VF a, VF b) {
  __m256 a_is_nan = _mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q);
  return {_mm256_blendv_ps(_mm256_max_ps(a.v, b.v), a.v, a_is_nan)};
}
// x, or `fallback` in the lanes where x is NaN
inline VF nan_to(VF x, VF fallback) {
  return {_mm256_blendv_ps(x.v, fallback.v, _mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q))};
}

inline VD operator+(VD a, VD b) { return {_mm256_add_pd(a.v, b.v)}; }
inline VD operator-(VD a, VD b) { return {_mm256_sub_pd(a.v, b.v)}; }
inline VD operator*(VD a, VD b) { return {_mm256_mul_pd(a.v, b.v)}; }
inline VD operator/(VD a, VD b) { return {_mm256_div_pd(a.v, b.v)}; }
inline VD fmadd(VD a, VD b, VD c) { return {_mm256_fmadd_pd(a.v, b.v, c.v)}; }
inline VD fmsub(VD a, VD b, VD c) { return {_mm256_fmsub_pd(a.v, b.v, c.v)}; }
inline VD vsqrt(VD a) { return {_mm256_sqrt_pd(a.v)}; }
inline VD max_nan(VD a, VD b) {
  __m256d a_is_nan = _mm256_cmp_pd(a.v, a.v, _CMP_UNORD_Q);
  return {_mm256_blendv_pd(_mm256_max_pd(a.v, b.v), a.v, a_is_nan)};
}
inline VD nan_to(VD x, VD fallback) {
  return {_mm256_blendv_pd(x.v, fallback.v, _mm256_cmp_pd(x.v, x.v, _CMP_UNORD_Q))};
}

template <typename S>
struct Lanes;

template <>
struct Lanes<float> {
  using Vec = VF;
  using Scalar = float;
  static constexpr int kWidth = 8;
  static Vec splat(float x) { return {_mm256_set1_ps(x)}; }
  static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static void store(float* p, Vec x) { _mm256_storeu_ps(p, x.v); }
};

template <>
struct Lanes<double> {
  using Vec = VD;
  using Scalar = double;
  static constexpr int kWidth = 4;
  static Vec splat(double x) { return {_mm256_set1_pd(x)}; }
  static Vec load(const double* p) { return {_mm256_loadu_pd(p)}; }
  static void store(double* p, Vec x) { _mm256_storeu_pd(p, x.v); }
};

#include "simd_pair.h"

// bf16 is the top half of an fp32. One 32-byte load of 16 values is widened by splitting each
// 32-bit word into its two values: `lo` holds the even elements (the low halves, shifted up),
// `hi` the odd ones (the high halves, masked). The kernels are elementwise; store() puts every
// value back in its half.
template <>
struct Lanes<bf16> {
  using Vec = Pair<VF>;
  using Scalar = float;
  static constexpr int kWidth = 16;
  static Vec splat(float x) { return {VF{_mm256_set1_ps(x)}, VF{_mm256_set1_ps(x)}}; }
  static Vec load(const bf16* p) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {VF{_mm256_castsi256_ps(_mm256_slli_epi32(x, 16))},
            VF{_mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(-65536)))}};
  }
  // Round to nearest even on 16-bit lanes, both vectors at once: the upper halves `top` (the
  // truncated bf16 values, in memory order) and the lower halves `rest` of the 16 fp32 values.
  // A value rounds up when rest + 0x7FFF + (top & 1) carries, that is when rest >= 0x8001 -
  // (top & 1). A NaN needs no case of its own: every NaN a kernel stores came from a bf16 load
  // or is x86's default NaN (0xFFC00000; a NaN hyper-parameter, from a Python float, is
  // 0x7FC00000), so its lower half is zero and it is stored as its own top half, quiet, payload
  // kept (as BFCVT and vcvtne2ps2bf16 keep it). 9 operations for 16 values (docs/CPU_KERNELS.md).
  static void store(bf16* p, Vec x) {
    const __m256i even = _mm256_castps_si256(x.lo.v), odd = _mm256_castps_si256(x.hi.v);
    const __m256i top = _mm256_blend_epi16(_mm256_srli_epi32(even, 16), odd, 0xAA);
    const __m256i rest = _mm256_blend_epi16(even, _mm256_slli_epi32(odd, 16), 0xAA);
    const __m256i threshold =
        _mm256_sub_epi16(_mm256_set1_epi16(-32767), _mm256_and_si256(top, _mm256_set1_epi16(1)));
    const __m256i carries = _mm256_cmpeq_epi16(_mm256_max_epu16(rest, threshold), rest);
    const __m256i rounded = _mm256_sub_epi16(top, carries);  // carries are -1
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), rounded);
  }
};

template <>
struct Lanes<half> {
  using Vec = VF;
  using Scalar = float;
  static constexpr int kWidth = 8;
  static Vec splat(float x) { return {_mm256_set1_ps(x)}; }
  static Vec load(const half* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
  }
  static void store(half* p, Vec x) {
    __m128i h = _mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  }
};
