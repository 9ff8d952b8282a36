// Checks, the work list and the single parallel region of one optimizer step (see step.h).
#include "step.h"

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <atomic>
#include <cmath>

#include "isa.h"

namespace fused_opt_cpu {
namespace {

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

int dtype_index(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return kFloat32;
    case at::kDouble: return kFloat64;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kFloat16;
    default: return -1;
  }
}

void check_length(const char* op, const char* name, const TensorRefs& list, size_t n,
                  bool required) {
  TORCH_CHECK(list.size() == n || (!required && list.empty()), "fused_opt.", op, ": expected ", n,
              " ", name, ", got ", list.size());
}

// Tensors whose memory the kernels may not read as plain values: views with a lazy negation or
// conjugation bit, and tensors of Python/functorch subclasses that only wrap others.
bool plain_memory(const at::Tensor& t) {
  const c10::DispatchKeySet keys = t.key_set();
  return !t.is_neg() && !t.is_conj() && !keys.has(c10::DispatchKey::Python) &&
         !keys.has(c10::DispatchKey::FuncTorchBatched) &&
         !keys.has(c10::DispatchKey::Functionalize) && t.has_storage();
}

void check_param(const char* op, size_t i, const at::Tensor& p) {
  TORCH_CHECK(p.defined(), "fused_opt.", op, ": params[", i, "] is undefined");
  TORCH_CHECK(p.is_floating_point(), "fused_opt.", op, ": params[", i, "] has dtype ",
              p.scalar_type(), ", not a float type");
  TORCH_CHECK(dtype_index(p.scalar_type()) >= 0, "fused_opt.", op, ": params[", i, "] has dtype ",
              p.scalar_type(), "; the cpp backend supports float32, float64, float16 and bfloat16");
  TORCH_CHECK(p.layout() == at::kStrided, "fused_opt.", op, ": params[", i, "] is ", p.layout(),
              "; only strided tensors are supported");
  TORCH_CHECK(p.device().is_cpu(), "fused_opt.", op, ": params[", i, "] is on ", p.device(),
              ", expected cpu");
  TORCH_CHECK(p.is_contiguous() || p.is_non_overlapping_and_dense(), "fused_opt.", op, ": params[",
              i, "] has sizes ", p.sizes(), " and strides ", p.strides(),
              ", which do not cover its memory densely; the cpp backend needs contiguous params "
              "(or dense permutations such as channels_last)");
  TORCH_CHECK(plain_memory(p), "fused_opt.", op, ": params[", i,
              "] is a lazy (neg/conj) view or a wrapper tensor; the cpp backend needs plain "
              "CPU tensors");
}

bool same_layout(const at::Tensor& t, const at::Tensor& p) {
  return (t.is_contiguous() && p.is_contiguous()) || t.strides() == p.strides();
}

// A grad or state tensor must match its param in shape, device and dtype. The kernels work
// elementwise over raw memory in the param's layout; a tensor laid out otherwise (a grad of
// other strides, state saved before the model moved to channels_last) goes through a copy.
void check_like_param(const char* op, const char* name, size_t i, const at::Tensor& t,
                      const at::Tensor& p) {
  TORCH_CHECK(t.defined(), "fused_opt.", op, ": ", name, "[", i, "] is undefined");
  TORCH_CHECK(t.layout() == at::kStrided, "fused_opt.", op, ": ", name, "[", i, "] is ", t.layout(),
              "; sparse gradients are not supported");
  TORCH_CHECK(t.sizes() == p.sizes() && t.device() == p.device(), "fused_opt.", op, ": ", name, "[",
              i, "] has shape ", t.sizes(), " on ", t.device(), ", expected ", p.sizes(), " on ",
              p.device(), " like params[", i, "]");
  TORCH_CHECK(t.scalar_type() == p.scalar_type(), "fused_opt.", op, ": ", name, "[", i,
              "] has dtype ", t.scalar_type(), ", expected ", p.scalar_type(), " like params[", i,
              "]");
  TORCH_CHECK(plain_memory(t), "fused_opt.", op, ": ", name, "[", i,
              "] is a lazy (neg/conj) view or a wrapper tensor; the cpp backend needs plain "
              "CPU tensors");
}

// `t` itself when it is laid out like its param `p`, else a copy in p's layout kept in `copies`
// until the step has run (rare: e.g. a contiguous grad of a channels_last param).
const at::Tensor& in_param_layout(const at::Tensor& t, const at::Tensor& p,
                                  std::vector<at::Tensor>& copies) {
  if (same_layout(t, p)) return t;
  copies.push_back(at::empty_like(p, at::MemoryFormat::Preserve));
  copies.back().copy_(t);
  return copies.back();
}

template <typename Work, typename Consts>
const void* grad_data(const at::Tensor& g, const at::Tensor& p, Plan<Work, Consts>& plan) {
  return in_param_layout(g, p, *plan.copies).const_data_ptr();
}

// A state tensor updated through a copy is written back by run_plan().
template <typename Work, typename Consts>
void* state_data(const at::Tensor& t, const at::Tensor& p, Plan<Work, Consts>& plan) {
  const at::Tensor& laid_out = in_param_layout(t, p, *plan.copies);
  if (&laid_out != &t) plan.write_backs->emplace_back(t, laid_out);
  return laid_out.mutable_data_ptr();
}

double scalar_value(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.numel() == 1, "fused_opt.", op, ": ", name, " must have one element, got ",
              t.numel());
  if (t.scalar_type() == at::kFloat && t.device().is_cpu() && plain_memory(t))
    return *t.const_data_ptr<float>();
  return t.item<double>();
}

bool skip_step(const char* op, const at::Tensor* found_inf) {
  return found_inf != nullptr && scalar_value(op, "found_inf", *found_inf) != 0;
}

// The plan of a step that found_inf skips: it runs nothing and writes nothing back.
template <typename Work, typename Consts>
Plan<Work, Consts>& skipped(Plan<Work, Consts>& plan) {
  plan.total = 0;
  plan.write_backs->clear();
  return plan;
}

// In-place updates must be visible to autograd's saved-tensor checks, as torch.optim's are.
void bump_version(const at::Tensor& t) {
  if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

// Starts loading, for writing, the counter that bump_version(t) increments: a heap object of
// its own per tensor, out of the caches once the step before has streamed its data through
// them. The bumps are atomic increments, which x86 does not overlap by itself. The counter's
// address is read from VariableVersion, whose one member is the pointer to it; should a torch
// release change that, nothing is prefetched (a prefetch never faults, whatever the address).
void prefetch_version_counter(const at::Tensor& t) {
  if constexpr (sizeof(c10::VariableVersion) == sizeof(void*)) {
    const c10::VariableVersion& version = t.unsafeGetTensorImpl()->version_counter();
    if (const void* counter = *reinterpret_cast<const void* const*>(&version))
      __builtin_prefetch(counter, /*rw=*/1);
  }
}

// Bumps the version counters of entry i of the first `count` of `lists` (the lists whose tensors
// the step writes), after prefetching those of entry i + kBumpAhead when it is below `end`.
void bump_versions(const TensorRefs* const* lists, size_t count, size_t i, size_t end) {
  if (i + kBumpAhead < end)
    for (size_t l = 0; l < count; ++l) prefetch_version_counter((*lists[l])[i + kBumpAhead]);
  for (size_t l = 0; l < count; ++l) bump_version((*lists[l])[i]);
}

// Calls range(begin, end) on parts of [0, n) that cover it: calls with many tensors on all
// threads, one contiguous part each. After a backward pass the metadata of thousands of small
// tensors is out of the caches, so checking and preparing them mostly waits on memory; threads
// overlap those waits. OpenMP hands out the parts by thread number, so each pass over the
// tensors finds their metadata in the cache of the thread that loaded it in the pass before.
template <typename Range>
void for_tensor_ranges(size_t n, const Range& range) {
  const int64_t threads = at::get_num_threads();
  if (n < kMinParallelChecks || threads <= 1 || at::in_parallel_region()) {
    range(size_t{0}, n);
    return;
  }
  const int64_t count = static_cast<int64_t>(n);
  at::parallel_for(0, count, (count + threads - 1) / threads, [&](int64_t begin, int64_t end) {
    range(static_cast<size_t>(begin), static_cast<size_t>(end));
  });
}

// Runs prepare(i) (checks, then reads of what the step needs) for every tensor index i, each
// thread prefetching ahead, two levels of pointers deep: prefetch(i + 8, 0) asks for the
// TensorImpls of index i + 8, prefetch(i + 4, 1) for the storages they point to. A failing
// check raises its error as it would serially (when several fail, the one a thread met first).
template <typename Prepare, typename Prefetch>
void prepare_each(size_t n, const Prepare& prepare, const Prefetch& prefetch) {
  constexpr size_t kAhead = 8;
  for_tensor_ranges(n, [&](size_t begin, size_t end) {
    for (size_t i = begin; i < end; ++i) {
      if (i + kAhead < end) prefetch(i + kAhead, 0);
      if (i + kAhead / 2 < end) prefetch(i + kAhead / 2, 1);
      prepare(i);
    }
  });
}

// Level 0: the TensorImpl; level 1: the StorageImpl it points to.
void prefetch_metadata(const at::Tensor& t, int level) {
  if (level == 0) {
    prefetch_tensor_impl(t.unsafeGetTensorImpl());
  } else if (t.has_storage()) {
    __builtin_prefetch(t.storage().unsafeGetStorageImpl());
  }
}

// Starts loading a tensor's first data line (a step tensor's count, read by the next pass).
void prefetch_data(const at::Tensor& t) { __builtin_prefetch(t.const_data_ptr()); }

// Points an empty plan at this thread's reused work list (one entry per tensor) and copies,
// so a step allocates nothing; returns the work list to fill.
template <typename Work, typename Consts>
std::vector<Work>& start_plan(Plan<Work, Consts>& plan, size_t n) {
  thread_local std::vector<Work> work;
  thread_local std::vector<at::Tensor> copies;
  thread_local std::vector<std::pair<at::Tensor, at::Tensor>> write_backs;
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
// parallel region (at::parallel_for: torch's thread pool and torch.set_num_threads), the
// threads taking the chunks in turn. Which thread runs a chunk does not change its result.
template <typename Run>
void for_each_chunk(int64_t total, const Run& run) {
  if (total == 0) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), total / kMinParallel);
  if (threads <= 1 || at::in_parallel_region()) {
    run(int64_t{0}, total);
    return;
  }
  const int64_t chunk =
      std::clamp(total / (threads * kChunksPerThread), kMinChunk, kMaxChunk) / 64 * 64;
  const int64_t chunks = (total + chunk - 1) / chunk;
  std::atomic<int64_t> next_chunk{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c = next_chunk.fetch_add(1, std::memory_order_relaxed); c < chunks;
         c = next_chunk.fetch_add(1, std::memory_order_relaxed)) {
      run(c * chunk, std::min(total, (c + 1) * chunk));
    }
  });
}

// The arithmetic, then the state tensors updated through copies are written back (below the
// version counting: the plan has counted this step's update once, as for every tensor).
template <typename Work, typename Consts>
void run_and_write_back(const Plan<Work, Consts>& plan) {
  for_each_chunk(plan.total, [&](int64_t begin, int64_t end) {
    run_range(*plan.work, begin, end, plan.consts);
  });
  at::AutoDispatchBelowADInplaceOrView uncounted;
  for (const auto& [state, copy] : *plan.write_backs) state.copy_(copy);
  plan.write_backs->clear();
  plan.copies->clear();
}

}  // namespace

// Both plans run in three passes over the tensors, each on all threads for large calls (see
// for_tensor_ranges): check every tensor and read where its memory is; then, once nothing can
// fail and found_inf has not skipped the step, advance the step counts and bump the version
// counters; the kernels run after. A call with a tensor laid out unlike its param fills its
// work list again on one thread, through copies (see in_param_layout).
SgdPlan plan_sgd(const SgdCall& call) {
  constexpr const char* kOp = "sgd_";
  const size_t n = call.params.size();
  check_length(kOp, "grads", call.grads, n, true);
  check_length(kOp, "momentum_buffers", call.momentum_buffers, n, false);
  TORCH_CHECK(call.momentum == 0 || call.momentum_buffers.size() == n,
              "fused_opt.sgd_: momentum != 0 needs one momentum buffer per param");

  const KernelTable& kernels = active_kernels();
  const bool scaled = call.grad_scale != nullptr;
  const bool use_momentum = call.momentum != 0;
  SgdPlan plan;
  std::vector<SgdTensor>& work = start_plan(plan, n);
  // work[i], unless `copying` is false and a tensor of param i needs a copy.
  const auto fill = [&](size_t i, bool copying) {
    const at::Tensor& p = call.params[i];
    const at::Tensor& g = call.grads[i];
    if (!copying &&
        (!same_layout(g, p) || (use_momentum && !same_layout(call.momentum_buffers[i], p))))
      return false;
    void* buffer = use_momentum ? state_data(call.momentum_buffers[i], p, plan) : nullptr;
    work[i] = {p.mutable_data_ptr(),
               grad_data(g, p, plan),
               buffer,
               0,
               p.numel(),
               kernels.sgd[dtype_index(p.scalar_type())][scaled][use_momentum]};
    return true;
  };
  std::atomic<bool> laid_out_like_params{true};
  const auto prepare = [&](size_t i) {
    const at::Tensor& p = call.params[i];
    check_param(kOp, i, p);
    check_like_param(kOp, "grads", i, call.grads[i], p);
    if (!call.momentum_buffers.empty())
      check_like_param(kOp, "momentum_buffers", i, call.momentum_buffers[i], p);
    if (!fill(i, false)) laid_out_like_params.store(false, std::memory_order_relaxed);
  };
  const auto prefetch = [&](size_t i, int level) {
    prefetch_metadata(call.params[i], level);
    prefetch_metadata(call.grads[i], level);
    if (!call.momentum_buffers.empty()) prefetch_metadata(call.momentum_buffers[i], level);
  };
  prepare_each(n, prepare, prefetch);
  if (call.check_only) return skip_step(kOp, call.found_inf), skipped(plan);
  if (!laid_out_like_params.load())
    for (size_t i = 0; i < n; ++i) fill(i, true);
  const int64_t total = assign_starts(work);
  // Everything is checked; from here on the call either changes nothing or does the full step.
  if (skip_step(kOp, call.found_inf)) return skipped(plan);
  const TensorRefs* const written[] = {&call.params, &call.momentum_buffers};
  for_tensor_ranges(n, [&](size_t begin, size_t end) {
    for (size_t i = begin; i < end; ++i) bump_versions(written, use_momentum ? 2 : 1, i, end);
  });
  const double scale = scaled ? scalar_value(kOp, "grad_scale", *call.grad_scale) : 1.0;
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

AdamPlan plan_adam(const AdamCall& call) {
  constexpr const char* kOp = "adam_";
  const size_t n = call.params.size();
  check_length(kOp, "grads", call.grads, n, true);
  check_length(kOp, "exp_avgs", call.exp_avgs, n, false);
  check_length(kOp, "exp_avg_sqs", call.exp_avg_sqs, n, false);
  check_length(kOp, "max_exp_avg_sqs", call.max_exp_avg_sqs, n, false);
  check_length(kOp, "steps", call.steps, n, false);
  TORCH_CHECK(call.exp_avgs.size() == n && call.exp_avg_sqs.size() == n && call.steps.size() == n,
              "fused_opt.adam_: every param needs exp_avg, exp_avg_sq and step");
  TORCH_CHECK(!call.amsgrad || call.max_exp_avg_sqs.size() == n,
              "fused_opt.adam_: amsgrad needs one max_exp_avg_sq per param");

  const KernelTable& kernels = active_kernels();
  const bool scaled = call.grad_scale != nullptr;
  const int decay = call.weight_decay == 0        ? kNoDecay
                    : call.decoupled_weight_decay ? kDecoupledDecay
                                                  : kL2Decay;
  AdamPlan plan;
  std::vector<AdamTensor>& work = start_plan(plan, n);
  // work[i] but its bias corrections, unless `copying` is false and a tensor needs a copy.
  const auto fill = [&](size_t i, bool copying) {
    const at::Tensor& p = call.params[i];
    if (!copying && (!same_layout(call.grads[i], p) || !same_layout(call.exp_avgs[i], p) ||
                     !same_layout(call.exp_avg_sqs[i], p) ||
                     (call.amsgrad && !same_layout(call.max_exp_avg_sqs[i], p))))
      return false;
    void* vmax = call.amsgrad ? state_data(call.max_exp_avg_sqs[i], p, plan) : nullptr;
    work[i] = {p.mutable_data_ptr(),
               grad_data(call.grads[i], p, plan),
               state_data(call.exp_avgs[i], p, plan),
               state_data(call.exp_avg_sqs[i], p, plan),
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
    const at::Tensor& p = call.params[i];
    const at::Tensor& s = call.steps[i];
    check_param(kOp, i, p);
    check_like_param(kOp, "grads", i, call.grads[i], p);
    check_like_param(kOp, "exp_avgs", i, call.exp_avgs[i], p);
    check_like_param(kOp, "exp_avg_sqs", i, call.exp_avg_sqs[i], p);
    if (!call.max_exp_avg_sqs.empty())
      check_like_param(kOp, "max_exp_avg_sqs", i, call.max_exp_avg_sqs[i], p);
    TORCH_CHECK(s.defined() && (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble) &&
                    s.numel() == 1 && s.device().is_cpu() && plain_memory(s),
                "fused_opt.adam_: steps[", i,
                "] must be a one-element float32 (or float64) CPU tensor, got ",
                s.defined() ? s.toString() : "undefined", " of shape ", s.sizes());
    prefetch_data(s);
    if (!fill(i, false)) laid_out_like_params.store(false, std::memory_order_relaxed);
  };
  const auto prefetch = [&](size_t i, int level) {
    for (const TensorRefs* list :
         {&call.params, &call.grads, &call.exp_avgs, &call.exp_avg_sqs, &call.steps})
      prefetch_metadata((*list)[i], level);
  };
  prepare_each(n, prepare, prefetch);
  if (call.check_only) return skip_step(kOp, call.found_inf), skipped(plan);
  if (!laid_out_like_params.load())
    for (size_t i = 0; i < n; ++i) fill(i, true);
  const int64_t total = assign_starts(work);
  if (skip_step(kOp, call.found_inf)) return skipped(plan);

  for_tensor_ranges(n, [&](size_t begin, size_t end) {
    // Bias corrections from each tensor's own step, in double as torch.optim computes them
    // (`1 - beta ** step`, `bias_correction2 ** 0.5`); consecutive equal steps reuse them.
    double last_step = -1.0;
    double neg_step_size = 0.0, bias_correction2_sqrt = 0.0;
    // The lists whose tensors the step writes: their version counters are bumped.
    const TensorRefs* const written[] = {&call.steps, &call.params, &call.exp_avgs,
                                         &call.exp_avg_sqs, &call.max_exp_avg_sqs};
    const size_t written_lists = call.amsgrad ? 5 : 4;
    for (size_t i = begin; i < end; ++i) {
      // `step += 1` in the step tensor's own dtype (float32, or float64 like torch.optim when
      // that is the default dtype), then used as a Python float.
      const at::Tensor& s = call.steps[i];
      double step;
      if (s.scalar_type() == at::kFloat) {
        float* count = s.mutable_data_ptr<float>();
        *count += 1.0f;
        step = *count;
      } else {
        double* count = s.mutable_data_ptr<double>();
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
      bump_versions(written, written_lists, i, end);
    }
  });
  const double scale = scaled ? scalar_value(kOp, "grad_scale", *call.grad_scale) : 1.0;
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

void run_plan(const SgdPlan& plan) { run_and_write_back(plan); }
void run_plan(const AdamPlan& plan) { run_and_write_back(plan); }

void run_stream_pass(float* const* arrays, int streams, int64_t n) {
  const KernelTable& kernels = active_kernels();
  for_each_chunk(n, [&](int64_t begin, int64_t end) {
    float* at[kMaxPassStreams];
    for (int s = 0; s < streams; ++s) at[s] = arrays[s] + begin;
    kernels.stream_pass(at, streams, end - begin, 0.0f);
  });
}

}  // namespace fused_opt_cpu
