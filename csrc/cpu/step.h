// One optimizer step over a list of CPU tensors, shared by the two front ends: the dispatcher
// kernels of fused_opt._C (ops.cpp: torch's stable ABI, any torch from the target version on)
// and the direct Python entry points of the optional accelerator fused_opt._C_direct
// (csrc/direct: torch's C++ API, loaded only on the torch it was built against).
//
// The code is written once, over a tensor type and its `Access` (stable_tensor.h,
// direct/aten_tensor.h): the few things the two APIs spell differently.
//
// plan_*() checks everything, reads found_inf, advances the step counts and bumps the version
// counters (and copies a grad or state tensor whose layout differs from its param's); only then
// is anything modified. run_plan() does the arithmetic in one parallel region and touches nothing
// but raw memory (the Python front end releases the GIL around it).
#pragma once

#include <torch/headeronly/core/ScalarType.h>

#include <cstddef>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kernel_api.h"

namespace fused_opt_cpu {

template <typename... Parts>
std::string message_of(const Parts&... parts) {
  std::ostringstream out;
  ((out << parts), ...);
  return out.str();
}

}  // namespace fused_opt_cpu

// Throws std::runtime_error (RuntimeError in Python) with the message alone: unlike
// STD_TORCH_CHECK it adds no function, file and line, which would only tell a user where the
// wheel was built. The message is made only when the check fails.
#define FUSED_OPT_CHECK(cond, ...)                                        \
  do {                                                                    \
    if (!(cond)) [[unlikely]]                                             \
      throw std::runtime_error(::fused_opt_cpu::message_of(__VA_ARGS__)); \
  } while (false)

namespace fused_opt_cpu {

// A borrowed list of tensors (the caller keeps them alive for the whole call).
template <typename Tensor>
struct TensorRefs {
  const Tensor* const* items = nullptr;
  size_t count = 0;
  size_t size() const { return count; }
  bool empty() const { return count == 0; }
  const Tensor& operator[](size_t i) const { return *items[i]; }
};

template <typename Tensor>
struct SgdCall {
  TensorRefs<Tensor> params, grads, momentum_buffers;
  double weight_decay, momentum, lr, dampening;
  bool nesterov, maximize, is_first_step;
  const Tensor* grad_scale;  // null when absent
  const Tensor* found_inf;
  bool check_only = false;  // plan_sgd() checks every tensor, then returns a plan that runs nothing
};

template <typename Tensor>
struct AdamCall {
  TensorRefs<Tensor> params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps;
  double lr, beta1, beta2, weight_decay, eps;
  bool amsgrad, maximize, decoupled_weight_decay;
  const Tensor* grad_scale;
  const Tensor* found_inf;
  bool check_only = false;
};

template <typename Tensor, typename Work, typename Consts>
struct Plan {
  const std::vector<Work>* work = nullptr;  // thread-local storage, valid until the next plan
  // Tensors laid out unlike their param are read (grads) or updated (state) through copies in
  // the param's layout; run_plan() writes the state copies back.
  std::vector<Tensor>* copies = nullptr;
  std::vector<std::pair<Tensor, Tensor>>* write_backs = nullptr;  // (state, its copy)
  int64_t total = 0;  // elements over all tensors; 0: nothing to run
  Consts consts{};
};
template <typename Tensor>
using SgdPlan = Plan<Tensor, SgdTensor, SgdConsts>;
template <typename Tensor>
using AdamPlan = Plan<Tensor, AdamTensor, AdamConsts>;

// Throw std::runtime_error (RuntimeError in Python) on bad input, before modifying anything.
// With check_only set they check and return a plan that runs nothing: a step over several calls
// checks all of them before the first one writes. Defined in step_impl.h.
template <typename Access>
SgdPlan<typename Access::Tensor> plan_sgd(const SgdCall<typename Access::Tensor>& call);
template <typename Access>
AdamPlan<typename Access::Tensor> plan_adam(const AdamCall<typename Access::Tensor>& call);

template <typename Access, typename Work, typename Consts>
void run_plan(const Plan<typename Access::Tensor, Work, Consts>& plan);

// The bandwidth floor's pass (KernelTable::stream_pass) over `streams` arrays of n elements,
// chunked and threaded as run_plan() runs a step's tensors.
template <typename Access>
void run_stream_pass(float* const* arrays, int streams, int64_t n);

}  // namespace fused_opt_cpu
