// The optimizer kernels, written once for every SIMD variant and storage dtype.
//
// Included inside an ISA namespace after that ISA's simd_<isa>.h, which provides Lanes<S>
// (load/store of storage type S into its compute vector: fp32 for fp32/bf16/fp16, fp64 for fp64),
// the vector operators, fmadd, vsqrt and max_nan. Each kernel updates elements [begin, end) of one
// tensor in a single pass: every input is read once and every output written once, in registers.
//
// The operations and their order are torch.optim's for-loop implementation (docs/ARCHITECTURE.md);
// `x.add_(y, alpha=a)` is computed as fmadd(y, a, x), which is what ATen's vectorised add does.
// Elements past the last full vector go through the same vector code via small stack buffers, so
// every element of a tensor gets bitwise the same arithmetic wherever a chunk boundary falls.

// The streams of the tensor a thread runs next, when this one is short (kMaxAheadBytes or less
// per stream): while element i of this tensor is worked on, the cache line holding element i of
// each of those streams is loaded into L2. Streams that short end before the hardware
// prefetchers get going, so each new tensor would otherwise start by waiting on memory; the
// more so when the next tensor does not follow this one in memory, as grads made by a backward
// pass do not (they lie among its temporaries). Kernel time over 2000 tensors of 4096 elements,
// paired in one process: bf16 (8 KB a stream) 0.2-0.8 ms a step more than one tensor of the
// same size without the loads, 0-0.1 ms with them; fp32 (16 KB a stream) 0.1-0.85 ms less with
// the loads for grads made by a backward, up to 0.5 ms less (in the noise in some pairs) for
// grads made one after another. At 32 KB a stream they no longer help, and loading only the next
// tensor's first part near the end of a longer one costs more than it saves.
constexpr int64_t kMaxAheadBytes = 16384;

// Every stream is also loaded kPrefetchBytes ahead of where the kernel works, into L1: with
// four or five streams a core's hardware prefetchers keep too few lines coming. Paired in one
// process with cold caches, 1 KB against none (Intel Xeon, 2 cores, AVX-512, 2026-12-02): one
// 32M-element tensor stepped 19% faster with bf16 SGD momentum, 26% with bf16 AdamW, 6% and 9%
// in fp32; 2000 tensors of 4096 elements 2-5% (SGD) and 5-6% (AdamW) in fp32, 0-5% in bf16,
// with the grads apart in memory or not. 2 KB reads alike on one tensor but was 2-4% slower
// with SGD on grads apart; 512 bytes did less, loads into L2 only or for writing no better.
// Past the end of a tensor this loads what follows it in memory, often the next tensor's own
// (params and state are allocated one after another); stopping at the end did no better.
constexpr int64_t kPrefetchBytes = 1024;

template <typename S, int N>
struct Ahead {
  const S* ptrs[N] = {};
  int streams = 0;  // how many of ptrs to load: those the kernel uses
  int64_t n = 0;    // elements of each to load
};

// The Ahead of `next` for a kernel on elements [begin, end) of `t`: next's first
// end - begin elements, when t is short and next is of the same kind (same kernel: same dtype).
template <typename S, int N, typename Tensor>
inline Ahead<S, N> ahead_of(const Tensor& t, int64_t begin, int64_t end, const Tensor& next,
                            const void* const (&next_ptrs)[N], int streams) {
  Ahead<S, N> ahead;
  if (next.kernel != t.kernel || t.numel * static_cast<int64_t>(sizeof(S)) > kMaxAheadBytes)
    return ahead;
  for (int s = 0; s < N; ++s) ahead.ptrs[s] = static_cast<const S*>(next_ptrs[s]);
  ahead.streams = streams;
  ahead.n = next.numel < end - begin ? next.numel : end - begin;
  return ahead;
}

// Calls step(at) with `at` = the N streams advanced to each full vector, then once more for the
// tail, copied into zero-padded stack buffers (the `written` ones are copied back). Every stream
// pointer is valid: a kernel passes the param's pointer for a stream it does not use, and the
// streams it uses come first (kUsed of them). Loads the lines kPrefetchBytes ahead of those and
// the lines of `ahead` alongside, one per stream for each cache line of elements done.
template <int kUsed, int N, typename S, typename Step>
inline void for_each_vector(int64_t n, S* const (&ptrs)[N], const bool (&written)[N],
                            const Ahead<S, N>& ahead, Step step) {
  static_assert(0 < kUsed && kUsed <= N, "a kernel uses some of its streams");
  constexpr int W = Lanes<S>::kWidth;
  constexpr int64_t kLine = 64 / sizeof(S);  // elements per cache line
  static_assert(W <= kLine && kLine % W == 0, "a vector lies within one cache line");
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    if (i % kLine == 0) {
      // As addresses, not pointers: the line ahead may lie past the end of the tensor.
      for (int s = 0; s < kUsed; ++s)
        __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(ptrs[s] + i) +
                                                         kPrefetchBytes),
                           0, 3);
      if (i < ahead.n)
        for (int s = 0; s < ahead.streams; ++s) __builtin_prefetch(ahead.ptrs[s] + i, 0, 2);
    }
    S* at[N];
    for (int s = 0; s < N; ++s) at[s] = ptrs[s] + i;
    step(at);
  }
  if (W > 1 && i < n) {
    const int64_t rest = n - i;
    S buffers[N][W];
    __builtin_memset(buffers, 0, sizeof buffers);
    S* at[N];
    for (int s = 0; s < N; ++s) {
      at[s] = buffers[s];
      __builtin_memcpy(buffers[s], ptrs[s] + i, rest * sizeof(S));
    }
    step(at);
    for (int s = 0; s < N; ++s)
      if (written[s]) __builtin_memcpy(ptrs[s] + i, buffers[s], rest * sizeof(S));
  }
}

// The gradient as both optimizers use it: unscaled by grad_scale when the kernel is scaled (a true
// division, as unscale-then-step divides), and negated when maximize (folded into the divisor
// when scaled: g / (-s) == -(g / s) exactly).
template <typename S, bool kScaled>
struct GradIn {
  using L = Lanes<S>;
  using V = typename L::Vec;
  using C = typename L::Scalar;
  V divisor, sign;
  bool maximize;

  template <typename Consts>
  explicit GradIn(const Consts& k)
      : divisor(L::splat(C(k.grad_divisor))),
        sign(L::splat(C(k.grad_sign))),
        maximize(k.maximize) {}

  V load(const S* at) const {
    const V g = L::load(at);
    if (kScaled) return g / divisor;
    return maximize ? g * sign : g;
  }
};

// ---- SGD -------------------------------------------------------------------------------------
template <typename S, bool kScaled, bool kMomentum>
void sgd_kernel(const SgdTensor& t, int64_t begin, int64_t end, const SgdConsts& k,
                const SgdTensor* next) {
  using L = Lanes<S>;
  using V = typename L::Vec;
  using C = typename L::Scalar;
  const GradIn<S, kScaled> grad(k);
  const V weight_decay = L::splat(C(k.weight_decay));
  const V momentum = L::splat(C(k.momentum));
  const V one_minus_dampening = L::splat(C(k.one_minus_dampening));
  const V neg_lr = L::splat(C(k.neg_lr));
  const bool decay = k.weight_decay != 0;
  const bool nesterov = k.nesterov, first = k.is_first_step;

  S* const param = static_cast<S*>(t.param) + begin;
  S* const ptrs[3] = {param, const_cast<S*>(static_cast<const S*>(t.grad)) + begin,
                      kMomentum ? static_cast<S*>(t.momentum_buffer) + begin : param};
  const bool written[3] = {true, false, kMomentum};
  constexpr int kUsed = kMomentum ? 3 : 2;
  const auto ahead = next == nullptr
                         ? Ahead<S, 3>{}
                         : ahead_of<S>(t, begin, end, *next,
                                       {next->param, next->grad, next->momentum_buffer}, kUsed);
  for_each_vector<kUsed>(end - begin, ptrs, written, ahead, [&](S* const* at) {
    V g = grad.load(at[1]);
    V p = L::load(at[0]);
    if (decay) g = fmadd(p, weight_decay, g);
    if (kMomentum) {
      V buf = first ? g : fmadd(g, one_minus_dampening, L::load(at[2]) * momentum);
      L::store(at[2], buf);
      g = nesterov ? fmadd(buf, momentum, g) : buf;
    }
    L::store(at[0], fmadd(g, neg_lr, p));
  });
}

// ---- Adam / AdamW ----------------------------------------------------------------------------
// x / c, rounded as the division rounds it, for a divisor c shared by the whole tensor (Adam's
// bias_correction2_sqrt): the product with y = c's rounded reciprocal, corrected twice by the
// residual q*c - x, which an FMA computes exactly. A quotient within one ulp corrected this way
// is the rounded quotient when y is the rounded reciprocal (Markstein's theorem); the product
// alone can be 1.5 ulps off, so the first correction brings it within one and the second makes
// it exact (tests/test_cpu_kernels.py checks every fp32 significand against the division).
// Writing the residual as q*c - x keeps -0 at -0. Inf and NaN turn the corrections into NaN;
// for them (and for zeros) the product itself is exact, so it is taken there. Only for c in
// [2^-20, 1], where no residual underflows or overflows whatever x is; bias_correction2_sqrt
// always is, unless beta2 lies within 2^-40 of 1.
template <typename V>
inline V divide_by_constant(V x, V c, V reciprocal, V neg_reciprocal) {
  const V q0 = x * reciprocal;
  const V q1 = fmadd(fmsub(q0, c, x), neg_reciprocal, q0);
  const V q2 = fmadd(fmsub(q1, c, x), neg_reciprocal, q1);
  return nan_to(q2, q0);
}

// A divisor shared by a whole tensor, splatted once, with what divide_by_constant needs. Its
// reciprocal path is used only where it is exact (`exact`); divide() takes the way to divide
// as a bool or, for a loop that must not branch on it, as a Const below.
template <typename L>
struct ConstantDivisor {
  using V = typename L::Vec;
  using C = typename L::Scalar;
  V c, reciprocal, neg_reciprocal;
  bool exact;  // c in [2^-20, 1]: no residual underflows or overflows

  explicit ConstantDivisor(C divisor)
      : c(L::splat(divisor)),
        reciprocal(L::splat(C(1) / divisor)),
        neg_reciprocal(L::splat(C(-1) / divisor)),
        exact(divisor >= C(0x1p-20) && divisor <= C(1)) {}

  template <typename ByReciprocal>
  V divide(V x, ByReciprocal by_reciprocal) const {
    return by_reciprocal ? divide_by_constant(x, c, reciprocal, neg_reciprocal) : x / c;
  }
};

// Whether Adam divides by bias_correction2_sqrt through divide_by_constant. A vector division
// holds the core's one divider for as long as the square root does, and the FMAs run elsewhere.
// With 16-bit storage the step waits on that divider: 2000 tensors of 4096 elements step
// 13-20% faster this way (bf16 and fp16, paired in one process), GPT-2's bf16 set 6-8%. With
// fp32 and fp64 it waits on memory, and the longer loop lost 1-5% (docs/CPU_KERNELS.md).
template <typename S>
constexpr bool kDividesByReciprocal = sizeof(S) == 2;

// A bool known at compile time, for generic lambdas (no <type_traits> here: see kernel_api.h).
template <bool B>
struct Const {
  constexpr operator bool() const { return B; }
};

template <typename S, bool kScaled, int kDecay, bool kAmsgrad>
void adam_kernel(const AdamTensor& t, int64_t begin, int64_t end, const AdamConsts& k,
                 const AdamTensor* next) {
  using L = Lanes<S>;
  using V = typename L::Vec;
  using C = typename L::Scalar;
  const GradIn<S, kScaled> grad(k);
  const V weight_decay = L::splat(C(k.weight_decay));
  const V decay_factor = L::splat(C(k.decay_factor));
  // torch's lerp: start + w * (end - start) when |w| < 0.5, else end + (w - 1) * (end - start)
  // (w - 1 rounded in the compute type, like torch's vectorised lerp).
  const C weight = C(k.lerp_weight);
  const bool small_weight = (weight < 0 ? -weight : weight) < C(0.5);
  const V lerp_coeff = L::splat(small_weight ? weight : weight - C(1));
  const V beta2 = L::splat(C(k.beta2));
  const V one_minus_beta2 = L::splat(C(k.one_minus_beta2));
  const V eps = L::splat(C(k.eps));
  const ConstantDivisor<L> bias_correction2_sqrt(C(t.bias_correction2_sqrt));
  const V neg_step_size = L::splat(C(t.neg_step_size));

  S* const param = static_cast<S*>(t.param) + begin;
  S* const ptrs[5] = {param, const_cast<S*>(static_cast<const S*>(t.grad)) + begin,
                      static_cast<S*>(t.exp_avg) + begin, static_cast<S*>(t.exp_avg_sq) + begin,
                      kAmsgrad ? static_cast<S*>(t.max_exp_avg_sq) + begin : param};
  const bool written[5] = {true, false, true, true, kAmsgrad};
  constexpr int kUsed = kAmsgrad ? 5 : 4;
  const auto ahead = next == nullptr ? Ahead<S, 5>{}
                                     : ahead_of<S>(t, begin, end, *next,
                                                   {next->param, next->grad, next->exp_avg,
                                                    next->exp_avg_sq, next->max_exp_avg_sq},
                                                   kUsed);
  // One loop for each way of dividing by bias_correction2_sqrt, neither branching on it.
  const auto run = [&](auto by_reciprocal) {
    for_each_vector<kUsed>(end - begin, ptrs, written, ahead, [&](S* const* at) {
      V g = grad.load(at[1]);
      V p = L::load(at[0]);
      if (kDecay == kDecoupledDecay) p = p * decay_factor;
      if (kDecay == kL2Decay) g = fmadd(p, weight_decay, g);
      V m = L::load(at[2]);
      m = small_weight ? fmadd(lerp_coeff, g - m, m) : fmadd(lerp_coeff, g - m, g);
      L::store(at[2], m);
      V v = L::load(at[3]) * beta2;
      // addcmul_(g, g, value): self + value * t1 * t2; ATen's vectorised loop gets the final
      // multiply-add contracted into one FMA by the compiler, so we fuse it explicitly.
      v = fmadd(one_minus_beta2 * g, g, v);
      L::store(at[3], v);
      if (kAmsgrad) {
        v = max_nan(L::load(at[4]), v);
        L::store(at[4], v);
      }
      const V root = vsqrt(v);
      const V denom = bias_correction2_sqrt.divide(root, by_reciprocal) + eps;
      L::store(at[0], p + (neg_step_size * m) / denom);  // addcdiv: self + value * t1 / t2
    });
  };
  if constexpr (kDividesByReciprocal<S>) {
    if (bias_correction2_sqrt.exact) return run(Const<true>{});
  }
  run(Const<false>{});
}

// What the 16-bit Adam kernels compute for sqrt(v) / bias_correction2_sqrt, on fp32 arrays.
inline void divide_by_constant_f32(const float* x, float* out, int64_t n, float c) {
  using L = Lanes<float>;
  const ConstantDivisor<L> divisor(c);
  float* const ptrs[2] = {const_cast<float*>(x), out};
  const bool written[2] = {false, true};
  for_each_vector<2>(n, ptrs, written, Ahead<float, 2>{}, [&](float* const* at) {
    L::store(at[1], divisor.divide(L::load(at[0]), divisor.exact));
  });
}

// ---- the bandwidth floor's pass ----------------------------------------------------------------
// A step's memory traffic with no arithmetic to wait on: reads N fp32 arrays of n elements and
// writes back all but the second (a step reads its grads and writes the rest), through the
// kernels' own loop and loads ahead. Each written element becomes x + zero * (the sum of its
// element in every array): itself for finite data, the zero being the caller's so that the
// compiler keeps every load and store. bench/ times it as the bandwidth floor of a step.
template <int N>
void stream_pass_of(float* const* arrays, int64_t n, float zero) {
  using L = Lanes<float>;
  using V = L::Vec;
  float* ptrs[N];
  bool written[N];
  for (int s = 0; s < N; ++s) {
    ptrs[s] = arrays[s];
    written[s] = s != 1;
  }
  const V z = L::splat(zero);
  for_each_vector<N>(n, ptrs, written, Ahead<float, N>{}, [&](float* const* at) {
    V loaded[N];
    V sum = loaded[0] = L::load(at[0]);
    for (int s = 1; s < N; ++s) sum = sum + (loaded[s] = L::load(at[s]));
    for (int s = 0; s < N; ++s)
      if (s != 1) L::store(at[s], fmadd(sum, z, loaded[s]));
  });
}

inline void stream_pass(float* const* arrays, int streams, int64_t n, float zero) {
  switch (streams) {
    case 1: return stream_pass_of<1>(arrays, n, zero);
    case 2: return stream_pass_of<2>(arrays, n, zero);
    case 3: return stream_pass_of<3>(arrays, n, zero);
    case 4: return stream_pass_of<4>(arrays, n, zero);
    default: return stream_pass_of<kMaxPassStreams>(arrays, n, zero);
  }
}

// ---- the table of one variant ----------------------------------------------------------------
template <typename S, bool kScaled>
constexpr void fill_adam(KernelTable& table, int dtype) {
  table.adam[dtype][kScaled][kNoDecay][0] = &adam_kernel<S, kScaled, kNoDecay, false>;
  table.adam[dtype][kScaled][kNoDecay][1] = &adam_kernel<S, kScaled, kNoDecay, true>;
  table.adam[dtype][kScaled][kL2Decay][0] = &adam_kernel<S, kScaled, kL2Decay, false>;
  table.adam[dtype][kScaled][kL2Decay][1] = &adam_kernel<S, kScaled, kL2Decay, true>;
  table.adam[dtype][kScaled][kDecoupledDecay][0] = &adam_kernel<S, kScaled, kDecoupledDecay, false>;
  table.adam[dtype][kScaled][kDecoupledDecay][1] = &adam_kernel<S, kScaled, kDecoupledDecay, true>;
}

template <typename S>
constexpr void fill_dtype(KernelTable& table, int dtype) {
  table.sgd[dtype][0][0] = &sgd_kernel<S, false, false>;
  table.sgd[dtype][0][1] = &sgd_kernel<S, false, true>;
  table.sgd[dtype][1][0] = &sgd_kernel<S, true, false>;
  table.sgd[dtype][1][1] = &sgd_kernel<S, true, true>;
  fill_adam<S, false>(table, dtype);
  fill_adam<S, true>(table, dtype);
}

constexpr KernelTable make_table(const char* name) {
  KernelTable table{};
  table.name = name;
  table.divide_by_constant = &divide_by_constant_f32;
  table.stream_pass = &stream_pass;
  fill_dtype<float>(table, kFloat32);
  fill_dtype<double>(table, kFloat64);
  fill_dtype<bf16>(table, kBFloat16);
  fill_dtype<half>(table, kFloat16);
  return table;
}
