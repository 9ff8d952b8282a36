// Checks, the work list and the single parallel region of one optimizer step (see step.h),
// over a tensor type's Access:
//
//   using Tensor                              the tensor type
//   kernels()                                 the active KernelTable
//   plain_memory(t)                           whether the kernels may read t's memory as values
//   dense(t)                                  contiguous, or a dense permutation of its memory
//   bump_version(t)                           count an in-place update for autograd
//   prefetch_metadata(t, level), prefetch_version_counter(t)
//   empty_like(t), copy(dst, src), copy_uncounted(dst, src)
//   item(t)                                   a one-element tensor's value as a double
//   num_threads(), in_parallel_region(), parallel_for(begin, end, grain, f)
//
// Included by the one file of each front end that instantiates the step for its tensor type.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <sstream>

#include "step.h"

namespace fused_opt_cpu {
namespace step_detail {

using torch::headeronly::ScalarType;

// The flat element space of a call is cut into chunks that the threads take in turn, so a thread
// the OS delays on a busy machine does not hold back the step: about 8 per thread, between 4096
// and 65536 elements (16-256 KiB per fp32 stream: long enough runs for the prefetchers), always a
// multiple of 64 elements (whole cache lines for every dtype). A call with less than kMinParallel
// elements per thread stays on one thread: opening a parallel region costs microseconds.
constexpr int64_t kMinChunk = 4096;
constexpr int64_t kMaxChunk = 65536;
constexpr int64_t kChunksPerThread = 8;
constexpr int64_t kMinParallel = 32768;
// Calls with at least this many tensors are checked by all threads (see for_tensor_ranges).
constexpr size_t kMinParallelChecks = 256;
// How many tensors ahead the version counters are prefetched before their bumps.
constexpr size_t kBumpAhead = 8;

inline int dtype_index(ScalarType type) {
  switch (type) {
    case ScalarType::Float: return kFloat32;
    case ScalarType::Double: return kFloat64;
    case ScalarType::BFloat16: return kBFloat16;
    case ScalarType::Half: return kFloat16;
    default: return -1;
  }
}

inline bool is_float_type(ScalarType type) {
  switch (type) {
    case ScalarType::Float8_e5m2:
    case ScalarType::Float8_e4m3fn:
    case ScalarType::Float8_e5m2fnuz:
    case ScalarType::Float8_e4m3fnuz: return true;
    default: return dtype_index(type) >= 0;
  }
}

// "[2, 3]": sizes or strides in error messages.
template <typename Values>
std::string bracketed(const Values& values) {
  std::ostringstream out;
  out << '[';
  for (size_t d = 0; d < values.size(); ++d) out << (d ? ", " : "") << values[d];
  out << ']';
  return out.str();
}

template <typename Tensor>
std::string shape_of(const Tensor& t) {
  return bracketed(t.sizes());
}

template <typename Tensor>
std::string strides_of(const Tensor& t) {
  return bracketed(t.strides());
}

template <typename Tensor>
std::string device_name_of(const Tensor& t) {
  if (t.is_cpu()) return "cpu";
  if (t.is_cuda()) return "cuda:" + std::to_string(static_cast<int>(t.get_device()));
  return "a device other than cpu and cuda";
}

template <typename A, typename B>
bool same_values(const A& a, const B& b) {
  return a.size() == b.size() && std::equal(a.data(), a.data() + a.size(), b.data());
}

template <typename Tensor>
bool same_sizes(const Tensor& a, const Tensor& b) {
  return same_values(a.sizes(), b.sizes());
}

template <typename Tensor>
void check_length(const char* op, const char* name, const TensorRefs<Tensor>& list, size_t n,
                  bool required) {
  FUSED_OPT_CHECK(list.size() == n || (!required && list.empty()), "fused_opt.", op, ": expected ",
                  n, " ", name, ", got ", list.size());
}

template <typename Access>
void check_param(const char* op, size_t i, const typename Access::Tensor& p) {
  FUSED_OPT_CHECK(p.defined(), "fused_opt.", op, ": params[", i, "] is undefined");
  FUSED_OPT_CHECK(is_float_type(p.scalar_type()), "fused_opt.", op, ": params[", i, "] has dtype ",
                  p.scalar_type(), ", not a float type");
  FUSED_OPT_CHECK(dtype_index(p.scalar_type()) >= 0, "fused_opt.", op, ": params[", i,
                  "] has dtype ", p.scalar_type(),
                  "; the cpp backend supports float32, float64, float16 and bfloat16");
  FUSED_OPT_CHECK(Access::strided(p), "fused_opt.", op, ": params[", i,
                  "] is not a strided tensor; only strided tensors are supported");
  FUSED_OPT_CHECK(p.is_cpu(), "fused_opt.", op, ": params[", i, "] is on ", device_name_of(p),
                  ", expected cpu");
  FUSED_OPT_CHECK(Access::dense(p), "fused_opt.", op, ": params[", i, "] has sizes ", shape_of(p),
                  " and strides ", strides_of(p),
                  ", which do not cover its memory densely; the cpp backend needs contiguous "
                  "params (or dense permutations such as channels_last)");
  FUSED_OPT_CHECK(Access::plain_memory(p), "fused_opt.", op, ": params[", i,
                  "] is a lazy (neg/conj) view or a wrapper tensor; the cpp backend needs plain "
                  "CPU tensors");
}

template <typename Tensor>
bool same_layout(const Tensor& t, const Tensor& p) {
  return (t.is_contiguous() && p.is_contiguous()) || same_values(t.strides(), p.strides());
}

// A grad or state tensor must match its param in shape, device and dtype. The kernels work
// elementwise over raw memory in the param's layout; a tensor laid out otherwise (a grad of
// other strides, state saved before the model moved to channels_last) goes through a copy.
template <typename Access>
void check_like_param(const char* op, const char* name, size_t i, const typename Access::Tensor& t,
                      const typename Access::Tensor& p) {
  FUSED_OPT_CHECK(t.defined(), "fused_opt.", op, ": ", name, "[", i, "] is undefined");
  FUSED_OPT_CHECK(Access::strided(t), "fused_opt.", op, ": ", name, "[", i,
                  "] is not a strided tensor; sparse gradients are not supported");
  FUSED_OPT_CHECK(same_sizes(t, p) && t.is_cpu(), "fused_opt.", op, ": ", name, "[", i,
                  "] has shape ", shape_of(t), " on ", device_name_of(t), ", expected ",
                  shape_of(p), " on ", device_name_of(p), " like params[", i, "]");
  FUSED_OPT_CHECK(t.scalar_type() == p.scalar_type(), "fused_opt.", op, ": ", name, "[", i,
                  "] has dtype ", t.scalar_type(), ", expected ", p.scalar_type(), " like params[",
                  i, "]");
  FUSED_OPT_CHECK(Access::plain_memory(t), "fused_opt.", op, ": ", name, "[", i,
                  "] is a lazy (neg/conj) view or a wrapper tensor; the cpp backend needs plain "
                  "CPU tensors");
}

// `t` itself when it is laid out like its param `p`, else a copy in p's layout kept in `copies`
// until the step has run (rare: e.g. a contiguous grad of a channels_last param).
template <typename Access, typename Tensor = typename Access::Tensor>
const Tensor& in_param_layout(const Tensor& t, const Tensor& p, std::vector<Tensor>& copies) {
  if (same_layout(t, p)) return t;
  copies.push_back(Access::empty_like(p));
  Access::copy(copies.back(), t);
  return copies.back();
}

template <typename Access, typename Plan, typename Tensor = typename Access::Tensor>
const void* grad_data(const Tensor& g, const Tensor& p, Plan& plan) {
  return in_param_layout<Access>(g, p, *plan.copies).const_data_ptr();
}

// A state tensor updated through a copy is written back by run_plan().
template <typename Access, typename Plan, typename Tensor = typename Access::Tensor>
void* state_data(const Tensor& t, const Tensor& p, Plan& plan) {
  const Tensor& laid_out = in_param_layout<Access>(t, p, *plan.copies);
  if (&laid_out != &t) plan.write_backs->emplace_back(t, laid_out);
  return laid_out.mutable_data_ptr();
}

template <typename Access>
double scalar_value(const char* op, const char* name, const typename Access::Tensor& t) {
  FUSED_OPT_CHECK(t.numel() == 1, "fused_opt.", op, ": ", name, " must have one element, got ",
                  t.numel());
  if (t.scalar_type() == ScalarType::Float && t.is_cpu() && Access::plain_memory(t))
    return *static_cast<const float*>(t.const_data_ptr());
  return Access::item(t);
}

template <typename Access>
bool skip_step(const char* op, const typename Access::Tensor* found_inf) {
  return found_inf != nullptr && scalar_value<Access>(op, "found_inf", *found_inf) != 0;
}

// The plan of a step that found_inf skips: it runs nothing and writes nothing back.
template <typename Plan>
Plan& skipped(Plan& plan) {
  plan.total = 0;
  plan.write_backs->clear();
  return plan;
}

// Bumps the version counters of entry i of the first `count` of `lists` (the lists whose tensors
// the step writes), after prefetching those of entry i + kBumpAhead when it is below `end`.
template <typename Access, typename Tensor = typename Access::Tensor>
void bump_versions(const TensorRefs<Tensor>* const* lists, size_t count, size_t i, size_t end) {
  if (i + kBumpAhead < end)
    for (size_t l = 0; l < count; ++l)
      Access::prefetch_version_counter((*lists[l])[i + kBumpAhead]);
  for (size_t l = 0; l < count; ++l) Access::bump_version((*lists[l])[i]);
}

// Calls range(begin, end) on parts of [0, n) that cover it: calls with many tensors on all
// threads, one contiguous part each. After a backward pass the metadata of thousands of small
// tensors is out of the caches, so checking and preparing them mostly waits on memory; threads
// overlap those waits. OpenMP hands out the parts by thread number, so each pass over the
// tensors finds their metadata in the cache of the thread that loaded it in the pass before.
template <typename Access, typename Range>
void for_tensor_ranges(size_t n, const Range& range) {
  const int64_t threads = Access::num_threads();
  if (n < kMinParallelChecks || threads <= 1 || Access::in_parallel_region()) {
    range(size_t{0}, n);
    return;
  }
  const int64_t count = static_cast<int64_t>(n);
  Access::parallel_for(0, count, (count + threads - 1) / threads, [&](int64_t begin, int64_t end) {
    range(static_cast<size_t>(begin), static_cast<size_t>(end));
  });
}

// Runs prepare(i) (checks, then reads of what the step needs) for every tensor index i, each
// thread prefetching ahead, two levels of pointers deep: prefetch(i + 8, 0) asks for the
// metadata of index i + 8, prefetch(i + 4, 1) for what it points to. A failing check raises its
// error as it would serially (when several fail, the one a thread met first).
template <typename Access, typename Prepare, typename Prefetch>
void prepare_each(size_t n, const Prepare& prepare, const Prefetch& prefetch) {
  constexpr size_t kAhead = 8;
  for_tensor_ranges<Access>(n, [&](size_t begin, size_t end) {
    for (size_t i = begin; i < end; ++i) {
      if (i + kAhead < end) prefetch(i + kAhead, 0);
      if (i + kAhead / 2 < end) prefetch(i + kAhead / 2, 1);
      prepare(i);
    }
  });
}

// Points an empty plan at this thread's reused work list (one entry per tensor) and copies,
// so a step allocates nothing; returns the work list to fill.
template <typename Tensor, typename Work, typename Consts>
std::vector<Work>& start_plan(Plan<Tensor, Work, Consts>& plan, size_t n) {
  thread_local std::vector<Work> work;
  thread_local std::vector<Tensor> copies;
  thread_local std::vector<std::pair<Tensor, Tensor>> write_backs;
  work.resize(n);  // every entry is filled before use
  copies.clear();
  write_backs.clear();
  plan.work = &work;
  plan.copies = &copies;
  plan.write_backs = &write_backs;
  return work;
}

// Places the tensors one after another in the call's flat element space; returns its size.
template <typename Work>
int64_t assign_starts(std::vector<Work>& work) {
  int64_t total = 0;
  for (Work& w : work) {
    w.start = total;
    total += w.numel;
  }
  return total;
}

// Runs elements [begin, end) of the flat space: each overlapped tensor's kernel on its part,
// told which tensor of the range comes next.
template <typename Work, typename Consts>
void run_range(const std::vector<Work>& work, int64_t begin, int64_t end, const Consts& consts) {
  auto it = std::upper_bound(work.begin(), work.end(), begin,
                             [](int64_t pos, const Work& w) { return pos < w.start + w.numel; });
  for (; it != work.end() && it->start < end; ++it) {
    const int64_t lo = std::max(begin, it->start) - it->start;
    const int64_t hi = std::min(end, it->start + it->numel) - it->start;
    const auto next = it + 1;
    it->kernel(*it, lo, hi, consts, next != work.end() && next->start < end ? &*next : nullptr);
  }
}

// Calls run(begin, end) on chunks covering [0, total) of a call's flat element space, in one
// parallel region (torch's thread pool and torch.set_num_threads), the threads taking the chunks
// in turn. Which thread runs a chunk does not change its result. Inside another parallel region
// torch's parallel_for runs its body once, inline: that thread then takes every chunk.
template <typename Access, typename Run>
void for_each_chunk(int64_t total, const Run& run) {
  if (total == 0) return;
  const int64_t threads = std::min<int64_t>(Access::num_threads(), total / kMinParallel);
  if (threads <= 1 || Access::in_parallel_region()) {
    run(int64_t{0}, total);
    return;
  }
  const int64_t chunk =
      std::clamp(total / (threads * kChunksPerThread), kMinChunk, kMaxChunk) / 64 * 64;
  const int64_t chunks = (total + chunk - 1) / chunk;
  std::atomic<int64_t> next_chunk{0};
  Access::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c = next_chunk.fetch_add(1, std::memory_order_relaxed); c < chunks;
         c = next_chunk.fetch_add(1, std::memory_order_relaxed)) {
      run(c * chunk, std::min(total, (c + 1) * chunk));
    }
  });
}

}  // namespace step_detail

// Both plans run in three passes over the tensors, each on all threads for large calls (see
// for_tensor_ranges): check every tensor and read where its memory is; then, once nothing can
// fail and found_inf has not skipped the step, advance the step counts and bump the version
// counters; the kernels run after. A call with a tensor laid out unlike its param fills its
// work list again on one thread, through copies (see in_param_layout).
template <typename Access>
SgdPlan<typename Access::Tensor> plan_sgd(const SgdCall<typename Access::Tensor>& call) {
  using namespace step_detail;
  using Tensor = typename Access::Tensor;
  constexpr const char* kOp = "sgd_";
  const size_t n = call.params.size();
  check_length(kOp, "grads", call.grads, n, true);
  check_length(kOp, "momentum_buffers", call.momentum_buffers, n, false);
  FUSED_OPT_CHECK(call.momentum == 0 || call.momentum_buffers.size() == n,
                  "fused_opt.sgd_: momentum != 0 needs one momentum buffer per param");

  const KernelTable& kernels = Access::kernels();
  const bool scaled = call.grad_scale != nullptr;
  const bool use_momentum = call.momentum != 0;
  SgdPlan<Tensor> plan;
  std::vector<SgdTensor>& work = start_plan(plan, n);
  // work[i], unless `copying` is false and a tensor of param i needs a copy.
  const auto fill = [&](size_t i, bool copying) {
    const Tensor& p = call.params[i];
    const Tensor& g = call.grads[i];
    if (!copying &&
        (!same_layout(g, p) || (use_momentum && !same_layout(call.momentum_buffers[i], p))))
      return false;
    void* buffer = use_momentum ? state_data<Access>(call.momentum_buffers[i], p, plan) : nullptr;
    work[i] = {p.mutable_data_ptr(),
               grad_data<Access>(g, p, plan),
               buffer,
               0,
               p.numel(),
               kernels.sgd[dtype_index(p.scalar_type())][scaled][use_momentum]};
    return true;
  };
  std::atomic<bool> laid_out_like_params{true};
  const auto prepare = [&](size_t i) {
    const Tensor& p = call.params[i];
    check_param<Access>(kOp, i, p);
    check_like_param<Access>(kOp, "grads", i, call.grads[i], p);
    if (!call.momentum_buffers.empty())
      check_like_param<Access>(kOp, "momentum_buffers", i, call.momentum_buffers[i], p);
    if (!fill(i, false)) laid_out_like_params.store(false, std::memory_order_relaxed);
  };
  const auto prefetch = [&](size_t i, int level) {
    Access::prefetch_metadata(call.params[i], level);
    Access::prefetch_metadata(call.grads[i], level);
    if (!call.momentum_buffers.empty()) Access::prefetch_metadata(call.momentum_buffers[i], level);
  };
  prepare_each<Access>(n, prepare, prefetch);
  if (call.check_only) return skip_step<Access>(kOp, call.found_inf), skipped(plan);
  if (!laid_out_like_params.load())
    for (size_t i = 0; i < n; ++i) fill(i, true);
  const int64_t total = assign_starts(work);
  // Everything is checked; from here on the call either changes nothing or does the full step.
  if (skip_step<Access>(kOp, call.found_inf)) return skipped(plan);
  const TensorRefs<Tensor>* const written[] = {&call.params, &call.momentum_buffers};
  for_tensor_ranges<Access>(n, [&](size_t begin, size_t end) {
    for (size_t i = begin; i < end; ++i)
      bump_versions<Access>(written, use_momentum ? 2 : 1, i, end);
  });
  const double scale = scaled ? scalar_value<Access>(kOp, "grad_scale", *call.grad_scale) : 1.0;
  SgdConsts& k = plan.consts;
  k.grad_divisor = call.maximize ? -scale : scale;
  k.grad_sign = call.maximize ? -1.0 : 1.0;
  k.weight_decay = call.weight_decay;
  k.momentum = call.momentum;
  k.one_minus_dampening = 1.0 - call.dampening;
  k.neg_lr = -call.lr;
  k.maximize = call.maximize;
  k.nesterov = call.nesterov;
  k.is_first_step = call.is_first_step;
  plan.total = total;
  return plan;
}

template <typename Access>
AdamPlan<typename Access::Tensor> plan_adam(const AdamCall<typename Access::Tensor>& call) {
  using namespace step_detail;
  using Tensor = typename Access::Tensor;
  constexpr const char* kOp = "adam_";
  const size_t n = call.params.size();
  check_length(kOp, "grads", call.grads, n, true);
  check_length(kOp, "exp_avgs", call.exp_avgs, n, false);
  check_length(kOp, "exp_avg_sqs", call.exp_avg_sqs, n, false);
  check_length(kOp, "max_exp_avg_sqs", call.max_exp_avg_sqs, n, false);
  check_length(kOp, "steps", call.steps, n, false);
  FUSED_OPT_CHECK(
      call.exp_avgs.size() == n && call.exp_avg_sqs.size() == n && call.steps.size() == n,
      "fused_opt.adam_: every param needs exp_avg, exp_avg_sq and step");
  FUSED_OPT_CHECK(!call.amsgrad || call.max_exp_avg_sqs.size() == n,
                  "fused_opt.adam_: amsgrad needs one max_exp_avg_sq per param");

  const KernelTable& kernels = Access::kernels();
  const bool scaled = call.grad_scale != nullptr;
  const int decay = call.weight_decay == 0        ? kNoDecay
                    : call.decoupled_weight_decay ? kDecoupledDecay
                                                  : kL2Decay;
  AdamPlan<Tensor> plan;
  std::vector<AdamTensor>& work = start_plan(plan, n);
  // work[i] but its bias corrections, unless `copying` is false and a tensor needs a copy.
  const auto fill = [&](size_t i, bool copying) {
    const Tensor& p = call.params[i];
    if (!copying && (!same_layout(call.grads[i], p) || !same_layout(call.exp_avgs[i], p) ||
                     !same_layout(call.exp_avg_sqs[i], p) ||
                     (call.amsgrad && !same_layout(call.max_exp_avg_sqs[i], p))))
      return false;
    void* vmax = call.amsgrad ? state_data<Access>(call.max_exp_avg_sqs[i], p, plan) : nullptr;
    work[i] = {p.mutable_data_ptr(),
               grad_data<Access>(call.grads[i], p, plan),
               state_data<Access>(call.exp_avgs[i], p, plan),
               state_data<Access>(call.exp_avg_sqs[i], p, plan),
               vmax,
               0,
               p.numel(),
               0.0,
               0.0,
               kernels.adam[dtype_index(p.scalar_type())][scaled][decay][call.amsgrad]};
    return true;
  };
  std::atomic<bool> laid_out_like_params{true};
  const auto prepare = [&](size_t i) {
    const Tensor& p = call.params[i];
    const Tensor& s = call.steps[i];
    check_param<Access>(kOp, i, p);
    check_like_param<Access>(kOp, "grads", i, call.grads[i], p);
    check_like_param<Access>(kOp, "exp_avgs", i, call.exp_avgs[i], p);
    check_like_param<Access>(kOp, "exp_avg_sqs", i, call.exp_avg_sqs[i], p);
    if (!call.max_exp_avg_sqs.empty())
      check_like_param<Access>(kOp, "max_exp_avg_sqs", i, call.max_exp_avg_sqs[i], p);
    FUSED_OPT_CHECK(
        s.defined() &&
            (s.scalar_type() == ScalarType::Float || s.scalar_type() == ScalarType::Double) &&
            s.numel() == 1 && s.is_cpu() && Access::plain_memory(s),
        "fused_opt.adam_: steps[", i,
        "] must be a one-element float32 (or float64) CPU tensor, got ",
        s.defined() ? torch::headeronly::toString(s.scalar_type()) : "undefined", " of shape ",
        s.defined() ? shape_of(s) : "[]", " on ", s.defined() ? device_name_of(s) : "no device");
    __builtin_prefetch(s.const_data_ptr());  // the count, read by the next pass
    if (!fill(i, false)) laid_out_like_params.store(false, std::memory_order_relaxed);
  };
  const auto prefetch = [&](size_t i, int level) {
    for (const TensorRefs<Tensor>* list :
         {&call.params, &call.grads, &call.exp_avgs, &call.exp_avg_sqs, &call.steps})
      Access::prefetch_metadata((*list)[i], level);
  };
  prepare_each<Access>(n, prepare, prefetch);
  if (call.check_only) return skip_step<Access>(kOp, call.found_inf), skipped(plan);
  if (!laid_out_like_params.load())
    for (size_t i = 0; i < n; ++i) fill(i, true);
  const int64_t total = assign_starts(work);
  if (skip_step<Access>(kOp, call.found_inf)) return skipped(plan);

  for_tensor_ranges<Access>(n, [&](size_t begin, size_t end) {
    // Bias corrections from each tensor's own step, in double as torch.optim computes them
    // (`1 - beta ** step`, `bias_correction2 ** 0.5`); consecutive equal steps reuse them.
    double last_step = -1.0;
    double neg_step_size = 0.0, bias_correction2_sqrt = 0.0;
    // The lists whose tensors the step writes: their version counters are bumped.
    const TensorRefs<Tensor>* const written[] = {&call.steps, &call.params, &call.exp_avgs,
                                                 &call.exp_avg_sqs, &call.max_exp_avg_sqs};
    const size_t written_lists = call.amsgrad ? 5 : 4;
    for (size_t i = begin; i < end; ++i) {
      // `step += 1` in the step tensor's own dtype (float32, or float64 like torch.optim when
      // that is the default dtype), then used as a Python float.
      const Tensor& s = call.steps[i];
      double step;
      if (s.scalar_type() == ScalarType::Float) {
        float* count = static_cast<float*>(s.mutable_data_ptr());
        *count += 1.0f;
        step = *count;
      } else {
        double* count = static_cast<double*>(s.mutable_data_ptr());
        *count += 1.0;
        step = *count;
      }
      if (step != last_step) {
        const double bias_correction1 = 1.0 - std::pow(call.beta1, step);
        const double bias_correction2 = 1.0 - std::pow(call.beta2, step);
        neg_step_size = -(call.lr / bias_correction1);
        bias_correction2_sqrt = std::pow(bias_correction2, 0.5);
        last_step = step;
      }
      work[i].neg_step_size = neg_step_size;
      work[i].bias_correction2_sqrt = bias_correction2_sqrt;
      bump_versions<Access>(written, written_lists, i, end);
    }
  });
  const double scale = scaled ? scalar_value<Access>(kOp, "grad_scale", *call.grad_scale) : 1.0;
  AdamConsts& k = plan.consts;
  k.grad_divisor = call.maximize ? -scale : scale;
  k.grad_sign = call.maximize ? -1.0 : 1.0;
  k.weight_decay = call.weight_decay;
  k.decay_factor = 1.0 - call.lr * call.weight_decay;
  k.lerp_weight = 1.0 - call.beta1;
  k.beta2 = call.beta2;
  k.one_minus_beta2 = 1.0 - call.beta2;
  k.eps = call.eps;
  k.maximize = call.maximize;
  plan.total = total;
  return plan;
}

// The arithmetic, then the state tensors updated through copies are written back (uncounted:
// the plan has counted this step's update once, as for every tensor).
template <typename Access, typename Work, typename Consts>
void run_plan(const Plan<typename Access::Tensor, Work, Consts>& plan) {
  using namespace step_detail;
  for_each_chunk<Access>(plan.total, [&](int64_t begin, int64_t end) {
    run_range(*plan.work, begin, end, plan.consts);
  });
  for (const auto& [state, copy] : *plan.write_backs) Access::copy_uncounted(state, copy);
  plan.write_backs->clear();
  plan.copies->clear();
}

template <typename Access>
void run_stream_pass(float* const* arrays, int streams, int64_t n) {
  const KernelTable& kernels = Access::kernels();
  step_detail::for_each_chunk<Access>(n, [&](int64_t begin, int64_t end) {
    float* at[kMaxPassStreams];
    for (int s = 0; s < streams; ++s) at[s] = arrays[s] + begin;
    kernels.stream_pass(at, streams, end - begin, 0.0f);
  });
}

}  // namespace fused_opt_cpu
