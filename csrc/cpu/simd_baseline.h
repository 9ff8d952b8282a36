// Portable scalar "vectors" (one lane) for the baseline kernels. fmadd is a true fused
// multiply-add (one rounding) as in the AVX2/AVX-512 variants, so every variant computes bitwise
// the same results: on CPUs with FMA hardware (every x86-64 since 2013, every AArch64) it is one
// instruction or a libm call that uses it; older x86 CPUs get glibc's exact software fma (slow).
// Included inside namespace fused_opt_cpu::baseline (see kernels_baseline.cpp).

inline float fmadd(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline double fmadd(double a, double b, double c) { return __builtin_fma(a, b, c); }
inline float fmsub(float a, float b, float c) { return __builtin_fmaf(a, b, -c); }  // a*b-c
inline double fmsub(double a, double b, double c) { return __builtin_fma(a, b, -c); }
inline float vsqrt(float a) { return __builtin_sqrtf(a); }
inline double vsqrt(double a) { return __builtin_sqrt(a); }
// torch.maximum: NaN if either input is NaN.
inline float max_nan(float a, float b) { return (a != a || a > b) ? a : b; }
inline double max_nan(double a, double b) { return (a != a || a > b) ? a : b; }
// x, or `fallback` where x is NaN
inline float nan_to(float x, float fallback) { return x != x ? fallback : x; }
inline double nan_to(double x, double fallback) { return x != x ? fallback : x; }

inline uint32_t float_bits(float x) {
  uint32_t u;
  __builtin_memcpy(&u, &x, sizeof u);
  return u;
}
inline float bits_float(uint32_t u) {
  float x;
  __builtin_memcpy(&x, &u, sizeof x);
  return x;
}

// bf16: the top 16 bits of an fp32; round to nearest even on the way down, NaN -> 0x7FC0.
inline float bf16_to_float(bf16 h) { return bits_float(uint32_t(h.bits) << 16); }
inline bf16 float_to_bf16(float x) {
  if (x != x) return bf16{0x7FC0};
  uint32_t u = float_bits(x);
  return bf16{uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};
}

// IEEE binary16 <-> binary32, round to nearest even, with subnormals, Inf and NaN.
inline float half_to_float(half h) {
  uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  uint32_t rest = h.bits & 0x7FFFu;
  if (rest >= 0x7C00u)  // Inf / NaN: keep the payload
    return bits_float(sign | 0x7F800000u | ((rest & 0x3FFu) << 13));
  if (rest >= 0x0400u)  // normal: rebias the exponent (127 - 15 = 112)
    return bits_float(sign | ((rest << 13) + (112u << 23)));
  // subnormal or zero: rest * 2^-24 is exact in fp32
  return bits_float(sign | float_bits(float(rest) * 5.9604644775390625e-08f));
}
inline half float_to_half(float x) {
  uint32_t u = float_bits(x);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7FFFFFFFu;
  if (u >= (143u << 23)) {  // |x| >= 65536 (or Inf/NaN): Inf, or a quiet NaN
    return half{uint16_t(sign | (u > 0x7F800000u ? 0x7E00u : 0x7C00u))};
  }
  if (u < (113u << 23)) {  // |x| < 2^-14: a half subnormal or zero
    // Adding 0.5 puts the half's subnormal grid at the fp32 mantissa's last bits, so the fp32
    // addition itself rounds to nearest even; then take the bits above 0.5's exponent.
    uint32_t shifted = float_bits(bits_float(u) + 0.5f);
    return half{uint16_t(sign | (shifted - float_bits(0.5f)))};
  }
  // Normal: rebias the exponent and drop 13 mantissa bits with round-to-nearest-even; a carry
  // out of the mantissa correctly bumps the exponent (up to Inf for 65520 <= |x| < 65536).
  uint32_t odd = (u >> 13) & 1u;
  u += (uint32_t(15 - 127) << 23) + 0xFFFu + odd;
  return half{uint16_t(sign | (u >> 13))};
}

template <typename S>
struct Lanes;

template <>
struct Lanes<float> {
  using Vec = float;
  using Scalar = float;
  static constexpr int kWidth = 1;
  static Vec splat(float x) { return x; }
  static Vec load(const float* p) { return *p; }
  static void store(float* p, Vec x) { *p = x; }
};

template <>
struct Lanes<double> {
  using Vec = double;
  using Scalar = double;
  static constexpr int kWidth = 1;
  static Vec splat(double x) { return x; }
  static Vec load(const double* p) { return *p; }
  static void store(double* p, Vec x) { *p = x; }
};

template <>
struct Lanes<bf16> {
  using Vec = float;
  using Scalar = float;
  static constexpr int kWidth = 1;
  static Vec splat(float x) { return x; }
  static Vec load(const bf16* p) { return bf16_to_float(*p); }
  static void store(bf16* p, Vec x) { *p = float_to_bf16(x); }
};

template <>
struct Lanes<half> {
  using Vec = float;
  using Scalar = float;
  static constexpr int kWidth = 1;
  static Vec splat(float x) { return x; }
  static Vec load(const half* p) { return half_to_float(*p); }
  static void store(half* p, Vec x) { *p = float_to_half(x); }
};
