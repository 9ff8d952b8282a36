// AArch64 SVE vectors of one fixed length for the kernels: __ARM_FEATURE_SVE_BITS (set by
// -msve-vector-bits) bits, 4 floats per 128 of them. SVE's length is the CPU's choice (128 bits
// on Grace and Graviton 4, 256 on Graviton 3); a fixed length gives the vectors a size, which the
// kernels' types need, so each length is its own variant, chosen only where the CPU's length is
// that one (isa.cpp). bf16 and fp16 values come in pairs of fp32 vectors, even and odd values
// (below). Built with +bf16 (FEAT_BF16, on every SVE CPU of a cluster).
// Included inside namespace fused_opt_cpu::sve<bits>, after <arm_sve.h>.

// (The attribute takes the macro itself, not a constant.)
constexpr int kSveBits = __ARM_FEATURE_SVE_BITS;
typedef svfloat32_t f32_vec __attribute__((arm_sve_vector_bits(__ARM_FEATURE_SVE_BITS)));
typedef svfloat64_t f64_vec __attribute__((arm_sve_vector_bits(__ARM_FEATURE_SVE_BITS)));

struct VF {
  f32_vec v;
};
struct VD {
  f64_vec v;
};

// Every operation acts on all lanes (svptrue): the kernels never work on a partial vector.
inline svbool_t all32() { return svptrue_b32(); }
inline svbool_t all64() { return svptrue_b64(); }

inline VF operator+(VF a, VF b) { return {svadd_f32_x(all32(), a.v, b.v)}; }
inline VF operator-(VF a, VF b) { return {svsub_f32_x(all32(), a.v, b.v)}; }
inline VF operator*(VF a, VF b) { return {svmul_f32_x(all32(), a.v, b.v)}; }
inline VF operator/(VF a, VF b) { return {svdiv_f32_x(all32(), a.v, b.v)}; }
// a*b+c and a*b-c (FNMSB: -c + a*b) with one rounding.
inline VF fmadd(VF a, VF b, VF c) { return {svmad_f32_x(all32(), a.v, b.v, c.v)}; }
inline VF fmsub(VF a, VF b, VF c) { return {svnmsb_f32_x(all32(), a.v, b.v, c.v)}; }
inline VF vsqrt(VF a) { return {svsqrt_f32_x(all32(), a.v)}; }
// torch.maximum, as the other variants compute it: a where a > b or a is NaN, else b.
inline VF max_nan(VF a, VF b) {
  const svbool_t take_a =
      svorr_b_z(all32(), svcmpgt_f32(all32(), a.v, b.v), svcmpuo_f32(all32(), a.v, a.v));
  return {svsel_f32(take_a, a.v, b.v)};
}
inline VF nan_to(VF x, VF fallback) {
  return {svsel_f32(svcmpuo_f32(all32(), x.v, x.v), fallback.v, x.v)};
}

inline VD operator+(VD a, VD b) { return {svadd_f64_x(all64(), a.v, b.v)}; }
inline VD operator-(VD a, VD b) { return {svsub_f64_x(all64(), a.v, b.v)}; }
inline VD operator*(VD a, VD b) { return {svmul_f64_x(all64(), a.v, b.v)}; }
inline VD operator/(VD a, VD b) { return {svdiv_f64_x(all64(), a.v, b.v)}; }
inline VD fmadd(VD a, VD b, VD c) { return {svmad_f64_x(all64(), a.v, b.v, c.v)}; }
inline VD fmsub(VD a, VD b, VD c) { return {svnmsb_f64_x(all64(), a.v, b.v, c.v)}; }
inline VD vsqrt(VD a) { return {svsqrt_f64_x(all64(), a.v)}; }
inline VD max_nan(VD a, VD b) {
  const svbool_t take_a =
      svorr_b_z(all64(), svcmpgt_f64(all64(), a.v, b.v), svcmpuo_f64(all64(), a.v, a.v));
  return {svsel_f64(take_a, a.v, b.v)};
}
inline VD nan_to(VD x, VD fallback) {
  return {svsel_f64(svcmpuo_f64(all64(), x.v, x.v), fallback.v, x.v)};
}

template <typename S>
struct Lanes;

#include "simd_pair.h"

// fp32 goes two registers at a time, as in simd_neon.h: the loop's own instructions are paid
// once per two registers.
template <>
struct Lanes<float> {
  using Vec = Pair<VF>;
  using Scalar = float;
  static constexpr int kWidth = 2 * kSveBits / 32;
  static Vec splat(float x) { return {VF{svdup_n_f32(x)}, VF{svdup_n_f32(x)}}; }
  static Vec load(const float* p) {
    return {VF{svld1_f32(all32(), p)}, VF{svld1_f32(all32(), p + kSveBits / 32)}};
  }
  static void store(float* p, Vec x) {
    svst1_f32(all32(), p, x.lo.v);
    svst1_f32(all32(), p + kSveBits / 32, x.hi.v);
  }
};

template <>
struct Lanes<double> {
  using Vec = VD;
  using Scalar = double;
  static constexpr int kWidth = kSveBits / 64;
  static Vec splat(double x) { return {svdup_n_f64(x)}; }
  static Vec load(const double* p) { return {svld1_f64(all64(), p)}; }
  static void store(double* p, Vec x) { svst1_f64(all64(), p, x.v); }
};

// 16-bit types: one full register of 2 * kSveBits / 32 values is loaded at once and split into
// its even-numbered values (`lo`) and odd-numbered ones (`hi`), each in its own 32-bit lane, and
// stored back interleaved: the kernels work lane by lane, so the order in between is free. For
// bf16 that is 3 instructions per register each way (fp16: 3 in, 4 out), where LD1H / ST1H into
// 32-bit lanes took 4, and a loop iteration covers twice the values.
inline svuint32_t load_u16_pairs(const void* p) {
  return svreinterpret_u32_u16(svld1_u16(svptrue_b16(), static_cast<const uint16_t*>(p)));
}
inline void store_u16_pairs(void* p, svuint16_t x) {
  svst1_u16(svptrue_b16(), static_cast<uint16_t*>(p), x);
}

// bf16 is the top half of an fp32: an even value is shifted up into it, an odd one is already
// there (its lower half is cleared). BFCVT writes the even values' bf16 into the lower halves,
// BFCVTNT the odd ones' into the upper halves. Both round to nearest even (FPCR's mode, which
// Linux leaves at nearest) and keep subnormals (FPCR.FZ is off); NaN stays a quiet NaN with its
// payload's top bits.
template <>
struct Lanes<bf16> {
  using Vec = Pair<VF>;
  using Scalar = float;
  static constexpr int kWidth = 2 * kSveBits / 32;
  static Vec splat(float x) { return {VF{svdup_n_f32(x)}, VF{svdup_n_f32(x)}}; }
  static Vec load(const bf16* p) {
    const svuint32_t x = load_u16_pairs(p);
    return {VF{svreinterpret_f32_u32(svlsl_n_u32_x(all32(), x, 16))},
            VF{svreinterpret_f32_u32(svand_n_u32_x(all32(), x, 0xFFFF0000u))}};
  }
  static void store(bf16* p, Vec x) {
    const svbfloat16_t even = svcvt_bf16_f32_x(all32(), x.lo.v);
    store_u16_pairs(p, svreinterpret_u16_bf16(svcvtnt_bf16_f32_m(even, all32(), x.hi.v)));
  }
};

// fp16 <-> fp32 by FCVT, which reads and writes the lower half of each 32-bit lane: the odd
// values are shifted down before, and the results interleaved by TRN1 after (FCVTNT and FCVTLT
// are SVE2, which Graviton 3 lacks). Round to nearest even, subnormals kept (FPCR.FZ16 is off).
template <>
struct Lanes<half> {
  using Vec = Pair<VF>;
  using Scalar = float;
  static constexpr int kWidth = 2 * kSveBits / 32;
  static Vec splat(float x) { return {VF{svdup_n_f32(x)}, VF{svdup_n_f32(x)}}; }
  static Vec load(const half* p) {
    const svuint32_t x = load_u16_pairs(p);
    return {VF{svcvt_f32_f16_x(all32(), svreinterpret_f16_u32(x))},
            VF{svcvt_f32_f16_x(all32(), svreinterpret_f16_u32(svlsr_n_u32_x(all32(), x, 16)))}};
  }
  static void store(half* p, Vec x) {
    const svfloat16_t even = svcvt_f16_f32_x(all32(), x.lo.v);
    const svfloat16_t odd = svcvt_f16_f32_x(all32(), x.hi.v);
    store_u16_pairs(p, svreinterpret_u16_f16(svtrn1_f16(even, odd)));
  }
};
