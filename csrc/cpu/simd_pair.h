// Two compute vectors used as one, for 16-bit storage types: a full register of bf16 values is
// loaded at once and widened into two fp32 registers, so every load and store moves a whole
// register and the widening costs one shuffle per register instead of two.
// Included inside an ISA namespace after that ISA's VF and its operators.

template <typename V>
struct Pair {
  V lo, hi;
};

template <typename V>
inline Pair<V> operator+(Pair<V> a, Pair<V> b) {
  return {a.lo + b.lo, a.hi + b.hi};
}
template <typename V>
inline Pair<V> operator-(Pair<V> a, Pair<V> b) {
  return {a.lo - b.lo, a.hi - b.hi};
}
template <typename V>
inline Pair<V> operator*(Pair<V> a, Pair<V> b) {
  return {a.lo * b.lo, a.hi * b.hi};
}
template <typename V>
inline Pair<V> operator/(Pair<V> a, Pair<V> b) {
  return {a.lo / b.lo, a.hi / b.hi};
}
template <typename V>
inline Pair<V> fmadd(Pair<V> a, Pair<V> b, Pair<V> c) {
  return {fmadd(a.lo, b.lo, c.lo), fmadd(a.hi, b.hi, c.hi)};
}
template <typename V>
inline Pair<V> fmsub(Pair<V> a, Pair<V> b, Pair<V> c) {
  return {fmsub(a.lo, b.lo, c.lo), fmsub(a.hi, b.hi, c.hi)};
}
template <typename V>
inline Pair<V> nan_to(Pair<V> x, Pair<V> fallback) {
  return {nan_to(x.lo, fallback.lo), nan_to(x.hi, fallback.hi)};
}
template <typename V>
inline Pair<V> vsqrt(Pair<V> a) {
  return {vsqrt(a.lo), vsqrt(a.hi)};
}
template <typename V>
inline Pair<V> max_nan(Pair<V> a, Pair<V> b) {
  return {max_nan(a.lo, b.lo), max_nan(a.hi, b.hi)};
}
