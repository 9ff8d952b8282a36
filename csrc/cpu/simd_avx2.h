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

// bf16 is the top half of an fp32. One 32-byte load of 16 values is widened by interleaving it
// with zeros within 128-bit lanes: `lo` holds elements 0-3 and 8-11, `hi` 4-7 and 12-15. The
// kernels are elementwise; the in-lane pack in store() restores the order.
template <>
struct Lanes<bf16> {
  using Vec = Pair<VF>;
  using Scalar = float;
  static constexpr int kWidth = 16;
  static Vec splat(float x) { return {VF{_mm256_set1_ps(x)}, VF{_mm256_set1_ps(x)}}; }
  static Vec load(const bf16* p) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i zero = _mm256_setzero_si256();
    return {VF{_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, x))},
            VF{_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, x))}};
  }
  static void store(bf16* p, Vec x) {
    // Every lane is <= 0xFFFF after rounded_top, so the unsigned saturating pack is exact.
    const __m256i packed = _mm256_packus_epi32(rounded_top(x.lo.v), rounded_top(x.hi.v));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
  }

 private:
  // Round to nearest even and shift down (see simd_avx512.h); NaN -> 0x7FC0.
  static __m256i rounded_top(__m256 x) {
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC00000), is_nan);
    return _mm256_srli_epi32(rounded, 16);
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
