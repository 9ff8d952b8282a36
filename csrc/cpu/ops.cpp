// The dispatcher front end: fused_opt::sgd_ / fused_opt::adam_ (every overload) on the CPU key,
// through torch's stable ABI, so that one binary serves every torch from its target version on.
#include <torch/csrc/stable/library.h>

#include <optional>
#include <vector>

#include "stable_tensor.h"
#include "step_impl.h"

namespace fused_opt_cpu {
namespace {

using torch::stable::Tensor;
using torch::stable::detail::to;

// A list argument, owned for the call, with the borrowed pointers the step reads it through.
struct ListArg {
  std::vector<Tensor> tensors;
  std::vector<const Tensor*> pointers;
  TensorRefs<Tensor> take(StableIValue value) {
    tensors = to<std::vector<Tensor>>(value);
    pointers.clear();
    for (const Tensor& t : tensors) pointers.push_back(&t);
    return {pointers.data(), pointers.size()};
  }
  void release() {
    tensors.clear();
    pointers.clear();
  }
};

// Releases a call's lists however it ends: after a failed check, this thread's reused storage
// must not keep the caller's tensors alive.
template <size_t N>
struct ReleasedOnExit {
  ListArg (&lists)[N];
  ~ReleasedOnExit() {
    for (ListArg& list : lists) list.release();
  }
};

// A hyper-parameter given as a float or (in the tensor overloads) a one-element tensor. Every
// argument is taken off the stack before any is checked, so that an error leaks none.
template <bool kTensor>
struct HyperArg {
  std::optional<Tensor> tensor;
  double number = 0;
  explicit HyperArg(StableIValue value) {
    if constexpr (kTensor) {
      tensor = to<Tensor>(value);
    } else {
      number = to<double>(value);
    }
  }
  double value(const char* op, const char* name) const {
    return tensor ? step_detail::scalar_value<StableAccess>(op, name, *tensor) : number;
  }
};

// Arguments: params, grads, momentum_buffers, weight_decay, momentum, lr, dampening, nesterov,
// maximize, is_first_step, grad_scale, found_inf.
template <bool kTensorLr>
void sgd_boxed(StableIValue* stack, uint64_t, uint64_t) {
  thread_local ListArg lists[3];
  const ReleasedOnExit<3> released{lists};
  SgdCall<Tensor> call{};
  call.params = lists[0].take(stack[0]);
  call.grads = lists[1].take(stack[1]);
  call.momentum_buffers = lists[2].take(stack[2]);
  call.weight_decay = to<double>(stack[3]);
  call.momentum = to<double>(stack[4]);
  const HyperArg<kTensorLr> lr(stack[5]);
  call.dampening = to<double>(stack[6]);
  call.nesterov = to<bool>(stack[7]);
  call.maximize = to<bool>(stack[8]);
  call.is_first_step = to<bool>(stack[9]);
  const std::optional<Tensor> grad_scale = to<std::optional<Tensor>>(stack[10]);
  const std::optional<Tensor> found_inf = to<std::optional<Tensor>>(stack[11]);
  call.grad_scale = grad_scale ? &*grad_scale : nullptr;
  call.found_inf = found_inf ? &*found_inf : nullptr;
  call.lr = lr.value("sgd_", "lr");
  run_plan<StableAccess>(plan_sgd<StableAccess>(call));
}

// Arguments: params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2,
// weight_decay, eps, amsgrad, maximize, decoupled_weight_decay, grad_scale, found_inf.
template <bool kTensorLr, bool kTensorHyper>
void adam_boxed(StableIValue* stack, uint64_t, uint64_t) {
  thread_local ListArg lists[6];
  const ReleasedOnExit<6> released{lists};
  AdamCall<Tensor> call{};
  call.params = lists[0].take(stack[0]);
  call.grads = lists[1].take(stack[1]);
  call.exp_avgs = lists[2].take(stack[2]);
  call.exp_avg_sqs = lists[3].take(stack[3]);
  call.max_exp_avg_sqs = lists[4].take(stack[4]);
  call.steps = lists[5].take(stack[5]);
  const HyperArg<kTensorLr> lr(stack[6]);
  const HyperArg<kTensorHyper> beta1(stack[7]), beta2(stack[8]), weight_decay(stack[9]);
  call.eps = to<double>(stack[10]);
  call.amsgrad = to<bool>(stack[11]);
  call.maximize = to<bool>(stack[12]);
  call.decoupled_weight_decay = to<bool>(stack[13]);
  const std::optional<Tensor> grad_scale = to<std::optional<Tensor>>(stack[14]);
  const std::optional<Tensor> found_inf = to<std::optional<Tensor>>(stack[15]);
  call.grad_scale = grad_scale ? &*grad_scale : nullptr;
  call.found_inf = found_inf ? &*found_inf : nullptr;
  call.lr = lr.value("adam_", "lr");
  call.beta1 = beta1.value("adam_", "beta1");
  call.beta2 = beta2.value("adam_", "beta2");
  call.weight_decay = weight_decay.value("adam_", "weight_decay");
  run_plan<StableAccess>(plan_adam<StableAccess>(call));
}

}  // namespace

void run_stream_pass_stable(float* const* arrays, int streams, int64_t n) {
  run_stream_pass<StableAccess>(arrays, streams, n);
}

STABLE_TORCH_LIBRARY_IMPL(fused_opt, CPU, m) {
  m.impl("sgd_", &sgd_boxed<false>);
  m.impl("sgd_.tensor_lr", &sgd_boxed<true>);
  m.impl("adam_", &adam_boxed<false, false>);
  m.impl("adam_.tensor_lr", &adam_boxed<true, false>);
  m.impl("adam_.tensor_hyper", &adam_boxed<true, true>);
}

}  // namespace fused_opt_cpu
