// One optimizer step over a list of CPU tensors, shared by the two front ends: the dispatcher
// kernels (ops.cpp, reached through torch.ops.fused_opt.*) and the direct Python entry points
// of fused_opt._C (module.cpp), which skip the boxing of every tensor into an IValue.
//
// plan_*() checks everything, reads found_inf, advances the step counts and bumps the version
// counters (and copies a grad or state tensor whose layout differs from its param's); only then
// is anything modified. run_plan() does the arithmetic in one parallel
// region and touches nothing but raw memory (the Python front end releases the GIL around it).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <utility>
#include <vector>

#include "kernel_api.h"

namespace fused_opt_cpu {

// A borrowed list of tensors (the caller keeps them alive for the whole call).
struct TensorRefs {
  const at::Tensor* const* items = nullptr;
  size_t count = 0;
  size_t size() const { return count; }
  bool empty() const { return count == 0; }
  const at::Tensor& operator[](size_t i) const { return *items[i]; }
};

struct SgdCall {
  TensorRefs params, grads, momentum_buffers;
  double weight_decay, momentum, lr, dampening;
  bool nesterov, maximize, is_first_step;
  const at::Tensor* grad_scale;  // null when absent
  const at::Tensor* found_inf;
  bool check_only = false;  // plan_sgd() checks every tensor, then returns a plan that runs nothing
};

struct AdamCall {
  TensorRefs params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps;
  double lr, beta1, beta2, weight_decay, eps;
  bool amsgrad, maximize, decoupled_weight_decay;
  const at::Tensor* grad_scale;
  const at::Tensor* found_inf;
  bool check_only = false;
};

template <typename Work, typename Consts>
struct Plan {
  const std::vector<Work>* work = nullptr;  // thread-local storage, valid until the next plan
  // Tensors laid out unlike their param are read (grads) or updated (state) through copies in
  // the param's layout; run_plan() writes the state copies back.
  std::vector<at::Tensor>* copies = nullptr;
  std::vector<std::pair<at::Tensor, at::Tensor>>* write_backs = nullptr;  // (state, its copy)
  int64_t total = 0;  // elements over all tensors; 0: nothing to run
  Consts consts{};
};
using SgdPlan = Plan<SgdTensor, SgdConsts>;
using AdamPlan = Plan<AdamTensor, AdamConsts>;

// Starts loading a TensorImpl (about four cache lines) ahead of use: the metadata of thousands of
// small tensors is out of the caches after a backward pass.
inline void prefetch_tensor_impl(const c10::TensorImpl* impl) {
  for (int line = 0; line < 4; ++line)
    __builtin_prefetch(reinterpret_cast<const char*>(impl) + 64 * line);
}

// Throw c10::Error (RuntimeError in Python) on bad input, before modifying anything. With
// check_only set they check and return a plan that runs nothing: a step over several calls checks
// all of them before the first one writes.
SgdPlan plan_sgd(const SgdCall& call);
AdamPlan plan_adam(const AdamCall& call);

void run_plan(const SgdPlan& plan);
void run_plan(const AdamPlan& plan);

// The bandwidth floor's pass (KernelTable::stream_pass) over `streams` arrays of n elements,
// chunked and threaded as run_plan() runs a step's tensors.
void run_stream_pass(float* const* arrays, int streams, int64_t n);

}  // namespace fused_opt_cpu
