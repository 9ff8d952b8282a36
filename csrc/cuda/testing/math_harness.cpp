// Host build of the CUDA kernels' per-element math, for GPU-less tests (tests/test_cuda.py).
//
// Compiled with g++ into a small shared library and driven through ctypes: each function applies
// one optimizer step to flat arrays exactly as a kernel thread does (the same scalars, the same
// update function), so the math is checked against torch.optim on machines without a GPU.
#include <cmath>
#include <cstdint>

#include "../optimizer_math.cuh"

namespace {

using namespace fused_opt::math;

template <typename C>
void sgd_step(C* param, const C* grad, C* momentum_buffer, int64_t n, double lr,
              double weight_decay, double momentum, double dampening, bool nesterov, bool maximize,
              bool is_first_step, bool has_grad_scale, float grad_scale) {
  const SgdScalars<C> s = make_sgd_scalars<C>(lr, weight_decay, momentum, dampening, nesterov,
                                              maximize, is_first_step, has_grad_scale, grad_scale);
  for (int64_t i = 0; i < n; ++i) {
    C unused = C(0);
    sgd_update(param[i], grad[i], momentum_buffer != nullptr ? momentum_buffer[i] : unused, s);
  }
}

template <typename C>
void adam_step(C* param, const C* grad, C* exp_avg, C* exp_avg_sq, C* max_exp_avg_sq, int64_t n,
               double step, double lr, double beta1, double beta2, double weight_decay, double eps,
               bool amsgrad, bool maximize, bool decoupled_weight_decay, bool has_grad_scale,
               float grad_scale) {
  // As the non-capturable launcher does: bias corrections in double on the host.
  const AdamScalars<C> s =
      make_adam_scalars<C>(lr, beta1, beta2, weight_decay, eps, bias_correction(beta1, step),
                           std::sqrt(bias_correction(beta2, step)), amsgrad, maximize,
                           decoupled_weight_decay, has_grad_scale, grad_scale);
  for (int64_t i = 0; i < n; ++i) {
    C unused = C(0);
    adam_update(param[i], grad[i], exp_avg[i], exp_avg_sq[i], amsgrad ? max_exp_avg_sq[i] : unused,
                s);
  }
}

}  // namespace

extern "C" {

void harness_sgd_f32(float* p, const float* g, float* buf, int64_t n, double lr, double wd,
                     double momentum, double dampening, int nesterov, int maximize, int first,
                     int has_scale, float scale) {
  sgd_step(p, g, buf, n, lr, wd, momentum, dampening, nesterov, maximize, first, has_scale, scale);
}

void harness_sgd_f64(double* p, const double* g, double* buf, int64_t n, double lr, double wd,
                     double momentum, double dampening, int nesterov, int maximize, int first,
                     int has_scale, float scale) {
  sgd_step(p, g, buf, n, lr, wd, momentum, dampening, nesterov, maximize, first, has_scale, scale);
}

void harness_adam_f32(float* p, const float* g, float* m, float* v, float* vmax, int64_t n,
                      double step, double lr, double beta1, double beta2, double wd, double eps,
                      int amsgrad, int maximize, int decoupled, int has_scale, float scale) {
  adam_step(p, g, m, v, vmax, n, step, lr, beta1, beta2, wd, eps, amsgrad, maximize, decoupled,
            has_scale, scale);
}

void harness_adam_f64(double* p, const double* g, double* m, double* v, double* vmax, int64_t n,
                      double step, double lr, double beta1, double beta2, double wd, double eps,
                      int amsgrad, int maximize, int decoupled, int has_scale, float scale) {
  adam_step(p, g, m, v, vmax, n, step, lr, beta1, beta2, wd, eps, amsgrad, maximize, decoupled,
            has_scale, scale);
}

}  // extern "C"
