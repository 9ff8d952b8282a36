// AVX-512 vectors for the kernels: 16 floats or 8 doubles per register.
// Included inside namespace fused_opt_cpu::avx512 (see kernels_avx512.cpp), after <immintrin.h>.

struct VF {
  __m512 v;
};
struct VD {
  __m512d v;
};

inline VF operator+(VF a, VF b) { return {_mm512_add_ps(a.v, b.v)}; }
inline VF operator-(VF a, VF b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline VF operator*(VF a, VF b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline VF operator/(VF a, VF b) { return {_mm512_div_ps(a.v, b.v)}; }
// a*b+c with one rounding
inline VF fmadd(VF a, VF b, VF c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline VF fmsub(VF a, VF b, VF c) { return {_mm512_fmsub_ps(a.v, b.v, c.v)}; }  // a*b-c
inline VF vsqrt(VF a) { return {_mm512_sqrt_ps(a.v)}; }
// max that returns NaN when either input is NaN (torch.maximum); max_ps alone returns b then.
inline VF max_nan(VF a, VF b) {
  __mmask16 a_is_nan = _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q);
  return {_mm512_mask_blend_ps(a_is_nan, _mm512_max_ps(a.v, b.v), a.v)};
}
// x, or `fallback` in the lanes where x is NaN
inline VF nan_to(VF x, VF fallback) {
  return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(x.v, x.v, _CMP_UNORD_Q), x.v, fallback.v)};
}

inline VD operator+(VD a, VD b) { return {_mm512_add_pd(a.v, b.v)}; }
inline VD operator-(VD a, VD b) { return {_mm512_sub_pd(a.v, b.v)}; }
inline VD operator*(VD a, VD b) { return {_mm512_mul_pd(a.v, b.v)}; }
inline VD operator/(VD a, VD b) { return {_mm512_div_pd(a.v, b.v)}; }
inline VD fmadd(VD a, VD b, VD c) { return {_mm512_fmadd_pd(a.v, b.v, c.v)}; }
inline VD fmsub(VD a, VD b, VD c) { return {_mm512_fmsub_pd(a.v, b.v, c.v)}; }
inline VD vsqrt(VD a) { return {_mm512_sqrt_pd(a.v)}; }
inline VD max_nan(VD a, VD b) {
  __mmask8 a_is_nan = _mm512_cmp_pd_mask(a.v, a.v, _CMP_UNORD_Q);
  return {_mm512_mask_blend_pd(a_is_nan, _mm512_max_pd(a.v, b.v), a.v)};
}
inline VD nan_to(VD x, VD fallback) {
  return {_mm512_mask_blend_pd(_mm512_cmp_pd_mask(x.v, x.v, _CMP_UNORD_Q), x.v, fallback.v)};
}

// Lanes<S>: how a storage type S is loaded into / stored from its compute vector.
template <typename S>
struct Lanes;

template <>
struct Lanes<float> {
  using Vec = VF;
  using Scalar = float;
  static constexpr int kWidth = 16;
  static Vec splat(float x) { return {_mm512_set1_ps(x)}; }
  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static void store(float* p, Vec x) { _mm512_storeu_ps(p, x.v); }
};

template <>
struct Lanes<double> {
  using Vec = VD;
  using Scalar = double;
  static constexpr int kWidth = 8;
  static Vec splat(double x) { return {_mm512_set1_pd(x)}; }
  static Vec load(const double* p) { return {_mm512_loadu_pd(p)}; }
  static void store(double* p, Vec x) { _mm512_storeu_pd(p, x.v); }
};

#include "simd_pair.h"

// bf16 is the top half of an fp32. One 64-byte load of 32 values is widened by interleaving it
// with zeros; the interleave works within 128-bit lanes, so `lo` holds elements 0-3, 8-11, ...
// and `hi` elements 4-7, 12-15, ... The kernels are elementwise; store() restores the order.
template <>
struct Lanes<bf16> {
  using Vec = Pair<VF>;
  using Scalar = float;
  static constexpr int kWidth = 32;
  static Vec splat(float x) { return {VF{_mm512_set1_ps(x)}, VF{_mm512_set1_ps(x)}}; }
  static Vec load(const bf16* p) {
    const __m512i x = _mm512_loadu_si512(p), zero = _mm512_setzero_si512();
    return {VF{_mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, x))},
            VF{_mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, x))}};
  }
  static void store(bf16* p, Vec x) {
#if defined(__AVX512BF16__)
    // vcvtne2ps2bf16 rounds to nearest even in one instruction but flushes subnormals to zero,
    // which Tensor.to(bfloat16) keeps: a register holding one takes the integer path below.
    if (!(_mm512_fpclass_ps_mask(x.lo.v, kSubnormal) |
          _mm512_fpclass_ps_mask(x.hi.v, kSubnormal))) {
      // The result holds lo's 16 values, then hi's; put the groups of four back in order.
      const __m512i packed = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(x.hi.v, x.lo.v));
      const __m512i order = _mm512_set_epi64(7, 3, 6, 2, 5, 1, 4, 0);
      _mm512_storeu_si512(p, _mm512_permutexvar_epi64(order, packed));
      return;
    }
#endif
    // The unsigned saturating pack takes the low halves back in the interleaved order.
    _mm512_storeu_si512(p, _mm512_packus_epi32(rounded_top(x.lo.v), rounded_top(x.hi.v)));
  }

 private:
  static constexpr int kSubnormal = 0x20;  // vfpclassps category: denormal
  // Round to nearest even and shift down: add 0x7FFF plus the lowest kept bit, keep the top 16
  // bits. A NaN would carry into the exponent; it becomes the quiet NaN 0x7FC0 instead (what
  // c10::BFloat16 stores).
  static __m512i rounded_top(__m512 x) {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF));
    const __mmask16 is_number = _mm512_cmp_ps_mask(x, x, _CMP_ORD_Q);
    const __m512i rounded =
        _mm512_mask_add_epi32(_mm512_set1_epi32(0x7FC00000), is_number, bits, bias);
    return _mm512_srli_epi32(rounded, 16);
  }
};

template <>
struct Lanes<half> {
  using Vec = VF;
  using Scalar = float;
  static constexpr int kWidth = 16;
  static Vec splat(float x) { return {_mm512_set1_ps(x)}; }
  static Vec load(const half* p) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
  }
  static void store(half* p, Vec x) {
    __m256i h = _mm512_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  }
};
