// The dispatcher front end: fused_opt::sgd_ / fused_opt::adam_ (every overload) on the CPU key.
//
// The kernels are registered boxed: the tensor lists are read in place from the dispatcher's
// argument stack (no std::vector<Tensor> copies, no refcount traffic per tensor).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <vector>

#include "step.h"

namespace fused_opt_cpu {
namespace {

// Borrowed pointers to the tensors of an IValue list, in reusable thread-local storage.
struct ListRefs {
  std::vector<const at::Tensor*> storage;
  TensorRefs from(const c10::IValue& list) {
    const c10::ArrayRef<c10::IValue> items = list.toListRef();
    storage.clear();
    storage.reserve(items.size());
    for (const c10::IValue& item : items) storage.push_back(&item.toTensor());
    return {storage.data(), storage.size()};
  }
};

const at::Tensor* optional_tensor(const c10::IValue& value) {
  return value.isTensor() ? &value.toTensor() : nullptr;
}

// A hyper-parameter given as a float or a 1-element tensor (lr; Adam's betas and weight decay
// in the tensor_hyper overload).
double hyper_value(const c10::IValue& value, const char* name) {
  if (!value.isTensor()) return value.toDouble();
  const at::Tensor& t = value.toTensor();
  TORCH_CHECK(t.numel() == 1, "fused_opt: ", name, " must have one element, got ", t.numel());
  return t.item<double>();
}

// Arguments: params, grads, momentum_buffers, weight_decay, momentum, lr, dampening, nesterov,
// maximize, is_first_step, grad_scale, found_inf.
void sgd_boxed(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const size_t num_args = op.schema().arguments().size();
  const c10::IValue* args = stack->data() + (stack->size() - num_args);
  thread_local ListRefs lists[3];
  SgdCall call{lists[0].from(args[0]), lists[1].from(args[1]),    lists[2].from(args[2]),
               args[3].toDouble(),     args[4].toDouble(),        hyper_value(args[5], "lr"),
               args[6].toDouble(),     args[7].toBool(),          args[8].toBool(),
               args[9].toBool(),       optional_tensor(args[10]), optional_tensor(args[11])};
  run_plan(plan_sgd(call));
  torch::jit::drop(*stack, num_args);
}

// Arguments: params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2,
// weight_decay, eps, amsgrad, maximize, decoupled_weight_decay, grad_scale, found_inf.
void adam_boxed(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const size_t num_args = op.schema().arguments().size();
  const c10::IValue* args = stack->data() + (stack->size() - num_args);
  thread_local ListRefs lists[6];
  AdamCall call{lists[0].from(args[0]),
                lists[1].from(args[1]),
                lists[2].from(args[2]),
                lists[3].from(args[3]),
                lists[4].from(args[4]),
                lists[5].from(args[5]),
                hyper_value(args[6], "lr"),
                hyper_value(args[7], "beta1"),
                hyper_value(args[8], "beta2"),
                hyper_value(args[9], "weight_decay"),
                args[10].toDouble(),
                args[11].toBool(),
                args[12].toBool(),
                args[13].toBool(),
                optional_tensor(args[14]),
                optional_tensor(args[15])};
  run_plan(plan_adam(call));
  torch::jit::drop(*stack, num_args);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_opt, CPU, m) {
  m.impl("sgd_", torch::CppFunction::makeFromBoxedFunction<&sgd_boxed>());
  m.impl("sgd_.tensor_lr", torch::CppFunction::makeFromBoxedFunction<&sgd_boxed>());
  m.impl("adam_", torch::CppFunction::makeFromBoxedFunction<&adam_boxed>());
  m.impl("adam_.tensor_lr", torch::CppFunction::makeFromBoxedFunction<&adam_boxed>());
  m.impl("adam_.tensor_hyper", torch::CppFunction::makeFromBoxedFunction<&adam_boxed>());
}

}  // namespace fused_opt_cpu
