// Torch glue of the CPU kernels: argument checks, the work list, one parallel region, and the
// registration as the CPU implementation of fused_opt::sgd_ / fused_opt::adam_ (both overloads).
//
// The kernels are registered boxed: the tensor lists are read in place from the dispatcher's
// argument stack (no std::vector<Tensor> copies, no refcount traffic per tensor), which keeps
// the per-tensor cost of a call with thousands of small tensors at a few tens of nanoseconds.
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "isa.h"
#include "kernel_api.h"

namespace fused_opt_cpu {
namespace {

// Work is split at multiples of one block (64 elements: whole cache lines for every dtype), and
// a call with less than kGrainBlocks of work per thread stays on one thread: opening a parallel
// region costs microseconds.
constexpr int64_t kBlock = 64;
constexpr int64_t kGrainBlocks = 512;  // 32768 elements

using IValueList = c10::ArrayRef<c10::IValue>;

int dtype_index(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return kFloat32;
    case at::kDouble: return kFloat64;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kFloat16;
    default: return -1;
  }
}

void check_length(const char* op, const char* name, IValueList list, size_t n, bool required) {
  TORCH_CHECK(list.size() == n || (!required && list.empty()), "fused_opt.", op, ": expected ", n,
              " ", name, ", got ", list.size());
}

void check_param(const char* op, size_t i, const at::Tensor& p) {
  TORCH_CHECK(p.is_floating_point(), "fused_opt.", op, ": params[", i, "] has dtype ",
              p.scalar_type(), ", not a float type");
  TORCH_CHECK(dtype_index(p.scalar_type()) >= 0, "fused_opt.", op, ": params[", i,
              "] has dtype ", p.scalar_type(),
              "; the cpp backend supports float32, float64, float16 and bfloat16");
  TORCH_CHECK(p.layout() == at::kStrided, "fused_opt.", op, ": params[", i, "] is ", p.layout(),
              "; only strided tensors are supported");
  TORCH_CHECK(p.device().is_cpu(), "fused_opt.", op, ": params[", i, "] is on ", p.device(),
              ", expected cpu");
  TORCH_CHECK(p.is_contiguous() || p.is_non_overlapping_and_dense(), "fused_opt.", op,
              ": params[", i, "] has sizes ", p.sizes(), " and strides ", p.strides(),
              ", which do not cover its memory densely; the cpp backend needs contiguous params "
              "(or dense permutations such as channels_last)");
}

// A grad or state tensor must match its param in everything the kernel assumes.
void check_like_param(const char* op, const char* name, size_t i, const at::Tensor& t,
                      const at::Tensor& p) {
  TORCH_CHECK(t.layout() == at::kStrided, "fused_opt.", op, ": ", name, "[", i, "] is ",
              t.layout(), "; sparse gradients are not supported");
  TORCH_CHECK(t.sizes() == p.sizes() && t.device() == p.device(), "fused_opt.", op, ": ", name,
              "[", i, "] has shape ", t.sizes(), " on ", t.device(), ", expected ", p.sizes(),
              " on ", p.device(), " like params[", i, "]");
  TORCH_CHECK(t.scalar_type() == p.scalar_type(), "fused_opt.", op, ": ", name, "[", i,
              "] has dtype ", t.scalar_type(), ", expected ", p.scalar_type(), " like params[", i,
              "]");
  // Elementwise over raw memory: both must lay the same elements at the same offsets.
  TORCH_CHECK((t.is_contiguous() && p.is_contiguous()) || t.strides() == p.strides(),
              "fused_opt.", op, ": ", name, "[", i, "] has strides ", t.strides(),
              " but params[", i, "] has strides ", p.strides(),
              "; the cpp backend needs grads and state laid out like their param");
}

double scalar_value(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.numel() == 1, "fused_opt.", op, ": ", name, " must have one element, got ",
              t.numel());
  if (t.scalar_type() == at::kFloat && t.device().is_cpu()) return *t.const_data_ptr<float>();
  return t.item<double>();
}

double lr_value(const char* op, const c10::IValue& lr) {
  return lr.isTensor() ? scalar_value(op, "lr", lr.toTensor()) : lr.toDouble();
}

bool skip_step(const char* op, const c10::IValue& found_inf) {
  return found_inf.isTensor() && scalar_value(op, "found_inf", found_inf.toTensor()) != 0;
}

// One parallel region over the flat element space of all tensors of the call. Each thread gets
// a contiguous range of whole blocks and walks the tensors it overlaps.
template <typename Work, typename Consts>
void run_parallel(const std::vector<Work>& work, int64_t total, const Consts& consts) {
  if (total == 0) return;
  const int64_t blocks = (total + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, kGrainBlocks, [&](int64_t first_block, int64_t last_block) {
    const int64_t begin = first_block * kBlock;
    const int64_t end = std::min(total, last_block * kBlock);
    auto it = std::upper_bound(work.begin(), work.end(), begin, [](int64_t pos, const Work& w) {
      return pos < w.start + w.numel;
    });
    for (; it != work.end() && it->start < end; ++it) {
      const int64_t lo = std::max(begin, it->start) - it->start;
      const int64_t hi = std::min(end, it->start + it->numel) - it->start;
      it->kernel(*it, lo, hi, consts);
    }
  });
}

// ---- sgd_ ------------------------------------------------------------------------------------
// Arguments: params, grads, momentum_buffers, weight_decay, momentum, lr, dampening, nesterov,
// maximize, is_first_step, grad_scale, found_inf.
void sgd_boxed(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  constexpr const char* kOp = "sgd_";
  const size_t num_args = op.schema().arguments().size();
  const c10::IValue* args = stack->data() + (stack->size() - num_args);
  const IValueList params = args[0].toListRef();
  const IValueList grads = args[1].toListRef();
  const IValueList buffers = args[2].toListRef();
  const double weight_decay = args[3].toDouble();
  const double momentum = args[4].toDouble();
  const double lr = lr_value(kOp, args[5]);
  const double dampening = args[6].toDouble();
  const bool nesterov = args[7].toBool(), maximize = args[8].toBool();
  const bool is_first_step = args[9].toBool();
  const c10::IValue& grad_scale = args[10];
  const c10::IValue& found_inf = args[11];

  const size_t n = params.size();
  check_length(kOp, "grads", grads, n, true);
  check_length(kOp, "momentum_buffers", buffers, n, false);
  TORCH_CHECK(momentum == 0 || buffers.size() == n,
              "fused_opt.sgd_: momentum != 0 needs one momentum buffer per param");

  const KernelTable& kernels = active_kernels();
  const bool scaled = grad_scale.isTensor();
  const bool use_momentum = momentum != 0;
  thread_local std::vector<SgdTensor> work;
  work.clear();
  work.reserve(n);
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i].toTensor();
    const at::Tensor& g = grads[i].toTensor();
    check_param(kOp, i, p);
    check_like_param(kOp, "grads", i, g, p);
    void* buffer = nullptr;
    if (!buffers.empty()) {
      const at::Tensor& b = buffers[i].toTensor();
      check_like_param(kOp, "momentum_buffers", i, b, p);
      if (use_momentum) buffer = b.mutable_data_ptr();
    }
    const int64_t numel = p.numel();
    if (numel == 0) continue;
    const int dtype = dtype_index(p.scalar_type());
    work.push_back({p.mutable_data_ptr(), g.const_data_ptr(), buffer, total, numel,
                    kernels.sgd[dtype][scaled][use_momentum]});
    total += numel;
  }
  // Everything is checked; from here on the call either changes nothing or does the full step.
  if (!skip_step(kOp, found_inf) && total > 0) {
    const double scale = scaled ? scalar_value(kOp, "grad_scale", grad_scale.toTensor()) : 1.0;
    SgdConsts consts{};
    consts.grad_divisor = maximize ? -scale : scale;
    consts.grad_sign = maximize ? -1.0 : 1.0;
    consts.weight_decay = weight_decay;
    consts.momentum = momentum;
    consts.one_minus_dampening = 1.0 - dampening;
    consts.neg_lr = -lr;
    consts.maximize = maximize;
    consts.nesterov = nesterov;
    consts.is_first_step = is_first_step;
    run_parallel(work, total, consts);
  }
  torch::jit::drop(*stack, num_args);
}

// ---- adam_ -----------------------------------------------------------------------------------
// Arguments: params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2,
// weight_decay, eps, amsgrad, maximize, decoupled_weight_decay, grad_scale, found_inf.
void adam_boxed(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  constexpr const char* kOp = "adam_";
  const size_t num_args = op.schema().arguments().size();
  const c10::IValue* args = stack->data() + (stack->size() - num_args);
  const IValueList params = args[0].toListRef();
  const IValueList grads = args[1].toListRef();
  const IValueList exp_avgs = args[2].toListRef();
  const IValueList exp_avg_sqs = args[3].toListRef();
  const IValueList max_exp_avg_sqs = args[4].toListRef();
  const IValueList steps = args[5].toListRef();
  const double lr = lr_value(kOp, args[6]);
  const double beta1 = args[7].toDouble(), beta2 = args[8].toDouble();
  const double weight_decay = args[9].toDouble(), eps = args[10].toDouble();
  const bool amsgrad = args[11].toBool(), maximize = args[12].toBool();
  const bool decoupled = args[13].toBool();
  const c10::IValue& grad_scale = args[14];
  const c10::IValue& found_inf = args[15];

  const size_t n = params.size();
  check_length(kOp, "grads", grads, n, true);
  check_length(kOp, "exp_avgs", exp_avgs, n, false);
  check_length(kOp, "exp_avg_sqs", exp_avg_sqs, n, false);
  check_length(kOp, "max_exp_avg_sqs", max_exp_avg_sqs, n, false);
  check_length(kOp, "steps", steps, n, false);
  TORCH_CHECK(exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n,
              "fused_opt.adam_: every param needs exp_avg, exp_avg_sq and step");
  TORCH_CHECK(!amsgrad || max_exp_avg_sqs.size() == n,
              "fused_opt.adam_: amsgrad needs one max_exp_avg_sq per param");

  const KernelTable& kernels = active_kernels();
  const bool scaled = grad_scale.isTensor();
  const int decay = weight_decay == 0 ? kNoDecay : decoupled ? kDecoupledDecay : kL2Decay;
  thread_local std::vector<AdamTensor> work;
  thread_local std::vector<float*> step_counts;
  work.clear();
  work.reserve(n);
  step_counts.clear();
  step_counts.reserve(n);
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i].toTensor();
    const at::Tensor& g = grads[i].toTensor();
    const at::Tensor& m = exp_avgs[i].toTensor();
    const at::Tensor& v = exp_avg_sqs[i].toTensor();
    const at::Tensor& s = steps[i].toTensor();
    check_param(kOp, i, p);
    check_like_param(kOp, "grads", i, g, p);
    check_like_param(kOp, "exp_avgs", i, m, p);
    check_like_param(kOp, "exp_avg_sqs", i, v, p);
    void* vmax = nullptr;
    if (!max_exp_avg_sqs.empty()) {
      const at::Tensor& x = max_exp_avg_sqs[i].toTensor();
      check_like_param(kOp, "max_exp_avg_sqs", i, x, p);
      if (amsgrad) vmax = x.mutable_data_ptr();
    }
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.numel() == 1 && s.device().is_cpu(),
                "fused_opt.adam_: steps[", i, "] must be a one-element float32 CPU tensor, got ",
                s.scalar_type(), " of shape ", s.sizes(), " on ", s.device());
    step_counts.push_back(s.mutable_data_ptr<float>());
    const int dtype = dtype_index(p.scalar_type());
    work.push_back({p.mutable_data_ptr(), g.const_data_ptr(), m.mutable_data_ptr(),
                    v.mutable_data_ptr(), vmax, total, p.numel(), 0.0, 0.0,
                    kernels.adam[dtype][scaled][decay][amsgrad]});
    total += p.numel();
  }
  if (!skip_step(kOp, found_inf)) {
    // Bias corrections from each tensor's own step, in double as torch.optim computes them
    // (`1 - beta ** step`, `bias_correction2 ** 0.5`); consecutive equal steps reuse them.
    float last_step = -1.0f;
    double neg_step_size = 0.0, bias_correction2_sqrt = 0.0;
    for (size_t i = 0; i < n; ++i) {
      const float step = *step_counts[i] + 1.0f;
      *step_counts[i] = step;
      if (step != last_step) {
        const double bias_correction1 = 1.0 - std::pow(beta1, double(step));
        const double bias_correction2 = 1.0 - std::pow(beta2, double(step));
        neg_step_size = -(lr / bias_correction1);
        bias_correction2_sqrt = std::pow(bias_correction2, 0.5);
        last_step = step;
      }
      work[i].neg_step_size = neg_step_size;
      work[i].bias_correction2_sqrt = bias_correction2_sqrt;
    }
    const double scale = scaled ? scalar_value(kOp, "grad_scale", grad_scale.toTensor()) : 1.0;
    AdamConsts consts{};
    consts.grad_divisor = maximize ? -scale : scale;
    consts.grad_sign = maximize ? -1.0 : 1.0;
    consts.weight_decay = weight_decay;
    consts.decay_factor = 1.0 - lr * weight_decay;
    consts.lerp_weight = 1.0 - beta1;
    consts.beta2 = beta2;
    consts.one_minus_beta2 = 1.0 - beta2;
    consts.eps = eps;
    consts.maximize = maximize;
    run_parallel(work, total, consts);
  }
  torch::jit::drop(*stack, num_args);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_opt, CPU, m) {
  m.impl("sgd_", torch::CppFunction::makeFromBoxedFunction<&sgd_boxed>());
  m.impl("sgd_.tensor_lr", torch::CppFunction::makeFromBoxedFunction<&sgd_boxed>());
  m.impl("adam_", torch::CppFunction::makeFromBoxedFunction<&adam_boxed>());
  m.impl("adam_.tensor_lr", torch::CppFunction::makeFromBoxedFunction<&adam_boxed>());
}

}  // namespace fused_opt_cpu
