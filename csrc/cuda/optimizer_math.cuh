// Per-element optimizer math shared by the CUDA kernels and their host-side test harness.
//
// Torch-free and CUDA-free when compiled by a host compiler: the same functions run in the
// kernels (nvcc) and in csrc/cuda/testing/math_harness.cpp (g++), which the CPU-only test suite
// checks against torch.optim. The order of operations is torch.optim's foreach order, as written
// in docs/ARCHITECTURE.md; C is the compute type (float for fp32/fp16/bf16, double for fp64).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define FUSED_OPT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FUSED_OPT_HOST_DEVICE inline
#endif

namespace fused_opt {
namespace math {

FUSED_OPT_HOST_DEVICE float square_root(float x) { return sqrtf(x); }
FUSED_OPT_HOST_DEVICE double square_root(double x) { return sqrt(x); }

// torch.maximum: a NaN on either side wins.
template <typename C>
FUSED_OPT_HOST_DEVICE C nan_propagating_max(C a, C b) {
  if (a != a) return a;
  if (b != b) return b;
  return a > b ? a : b;
}

// torch's lerp, which is exact at both ends of the weight range.
template <typename C>
FUSED_OPT_HOST_DEVICE C lerp(C start, C end, C weight) {
  const C abs_weight = weight < C(0) ? -weight : weight;
  return abs_weight < C(0.5) ? start + weight * (end - start)
                             : end - (end - start) * (C(1) - weight);
}

// grad / grad_scale, negated when maximizing.
template <typename C>
FUSED_OPT_HOST_DEVICE C effective_grad(C grad, bool has_grad_scale, C grad_scale, bool maximize) {
  C g = has_grad_scale ? grad / grad_scale : grad;
  return maximize ? -g : g;
}

// SGD hyper-parameters in compute precision (each rounded once from the host's double).
template <typename C>
struct SgdScalars {
  C neg_lr;
  C weight_decay;
  C momentum;
  C one_minus_dampening;
  C grad_scale;
  bool has_weight_decay;
  bool has_momentum;
  bool has_grad_scale;
  bool nesterov;
  bool maximize;
  bool is_first_step;
};

template <typename C>
FUSED_OPT_HOST_DEVICE SgdScalars<C> make_sgd_scalars(double lr, double weight_decay,
                                                     double momentum, double dampening,
                                                     bool nesterov, bool maximize,
                                                     bool is_first_step, bool has_grad_scale,
                                                     float grad_scale) {
  SgdScalars<C> s;
  s.neg_lr = static_cast<C>(-lr);
  s.weight_decay = static_cast<C>(weight_decay);
  s.momentum = static_cast<C>(momentum);
  s.one_minus_dampening = static_cast<C>(1.0 - dampening);
  s.grad_scale = static_cast<C>(grad_scale);
  s.has_weight_decay = weight_decay != 0.0;
  s.has_momentum = momentum != 0.0;
  s.has_grad_scale = has_grad_scale;
  s.nesterov = nesterov;
  s.maximize = maximize;
  s.is_first_step = is_first_step;
  return s;
}

// One SGD element. `momentum_buffer` is ignored unless s.has_momentum.
template <typename C>
FUSED_OPT_HOST_DEVICE void sgd_update(C& param, C grad, C& momentum_buffer,
                                      const SgdScalars<C>& s) {
  C g = effective_grad(grad, s.has_grad_scale, s.grad_scale, s.maximize);
  if (s.has_weight_decay) g = g + s.weight_decay * param;
  if (s.has_momentum) {
    if (s.is_first_step) {
      momentum_buffer = g;
    } else {
      momentum_buffer = momentum_buffer * s.momentum;
      momentum_buffer = momentum_buffer + s.one_minus_dampening * g;
    }
    g = s.nesterov ? g + s.momentum * momentum_buffer : momentum_buffer;
  }
  param = param + s.neg_lr * g;
}

// Adam/AdamW hyper-parameters in compute precision. neg_step_size = -lr / bias_correction1 and
// bias_correction2_sqrt are per tensor (each tensor has its own step count).
template <typename C>
struct AdamScalars {
  C one_minus_beta1;  // the lerp weight
  C beta2;
  C one_minus_beta2;
  C weight_decay;
  C decay_factor;  // 1 - lr * weight_decay (decoupled weight decay)
  C eps;
  C neg_step_size;
  C bias_correction2_sqrt;
  C grad_scale;
  bool has_weight_decay;
  bool decoupled_weight_decay;
  bool has_grad_scale;
  bool maximize;
  bool amsgrad;
};

// bias_correction1 = 1 - beta1^step and bias_correction2_sqrt = sqrt(1 - beta2^step), in double.
template <typename C>
FUSED_OPT_HOST_DEVICE AdamScalars<C> make_adam_scalars(double lr, double beta1, double beta2,
                                                       double weight_decay, double eps,
                                                       double bias_correction1,
                                                       double bias_correction2_sqrt, bool amsgrad,
                                                       bool maximize, bool decoupled_weight_decay,
                                                       bool has_grad_scale, float grad_scale) {
  AdamScalars<C> s;
  s.one_minus_beta1 = static_cast<C>(1.0 - beta1);
  s.beta2 = static_cast<C>(beta2);
  s.one_minus_beta2 = static_cast<C>(1.0 - beta2);
  s.weight_decay = static_cast<C>(weight_decay);
  s.decay_factor = static_cast<C>(1.0 - lr * weight_decay);
  s.eps = static_cast<C>(eps);
  s.neg_step_size = static_cast<C>(-lr / bias_correction1);
  s.bias_correction2_sqrt = static_cast<C>(bias_correction2_sqrt);
  s.grad_scale = static_cast<C>(grad_scale);
  s.has_weight_decay = weight_decay != 0.0;
  s.decoupled_weight_decay = decoupled_weight_decay;
  s.has_grad_scale = has_grad_scale;
  s.maximize = maximize;
  s.amsgrad = amsgrad;
  return s;
}

// One Adam/AdamW element. `max_exp_avg_sq` is ignored unless s.amsgrad.
template <typename C>
FUSED_OPT_HOST_DEVICE void adam_update(C& param, C grad, C& exp_avg, C& exp_avg_sq,
                                       C& max_exp_avg_sq, const AdamScalars<C>& s) {
  C g = effective_grad(grad, s.has_grad_scale, s.grad_scale, s.maximize);
  if (s.has_weight_decay) {
    if (s.decoupled_weight_decay) {
      param = param * s.decay_factor;
    } else {
      g = g + s.weight_decay * param;
    }
  }
  exp_avg = lerp(exp_avg, g, s.one_minus_beta1);
  exp_avg_sq = exp_avg_sq * s.beta2;
  exp_avg_sq = exp_avg_sq + s.one_minus_beta2 * g * g;
  C second_moment = exp_avg_sq;
  if (s.amsgrad) {
    max_exp_avg_sq = nan_propagating_max(max_exp_avg_sq, exp_avg_sq);
    second_moment = max_exp_avg_sq;
  }
  const C denom = square_root(second_moment) / s.bias_correction2_sqrt + s.eps;
  param = param + s.neg_step_size * (exp_avg / denom);
}

// 1 - beta^step in double, for a step count that already includes this step.
FUSED_OPT_HOST_DEVICE double bias_correction(double beta, double step) {
  return 1.0 - pow(beta, step);
}

}  // namespace math
}  // namespace fused_opt
