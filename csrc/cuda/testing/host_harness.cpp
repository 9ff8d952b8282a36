// Host emulation of the CUDA launches, for GPU-less tests (tests/test_cuda.py).
//
// Built with g++ into a small shared library and driven through ctypes. It runs the very code of
// the kernels (sgd_op.cuh, adam_op.cuh, multi_tensor_apply.cuh, optimizer_math.cuh) for fp32,
// fp64 and bf16: the same table packing as the GPU launchers, then, for each packed table, what a
// launch does: process_chunk for every (block, thread). Threads share nothing, so running them
// one after another gives the GPU's result up to FMA contraction. It checks the math, the chunk
// lookup, the vector and scalar paths and the launch count without a GPU. bf16 (8 elements per
// vector, half the ILP) uses the host conversions below in place of cuda_bf16.h's.
#include <cstdint>
#include <cstring>
#include <vector>

#include "../adam_op.cuh"
#include "../multi_tensor_apply.cuh"
#include "../sgd_op.cuh"

namespace fused_opt {
namespace cuda {

// bfloat16 storage for the host build; round to nearest even on store, NaN stays NaN.
struct HostBFloat16 {
  uint16_t bits;
};

inline float to_compute(HostBFloat16 x) {
  const uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <>
inline HostBFloat16 from_compute<HostBFloat16>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return HostBFloat16{uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return HostBFloat16{uint16_t(u >> 16)};
}

}  // namespace cuda
}  // namespace fused_opt

namespace {

using namespace fused_opt::cuda;

struct HostEmulator {
  int64_t launches = 0;

  template <typename Op>
  bool launch(const TensorTable<Op::kLists, typename Op::PerTensor>& table,
              const typename Op::Args& args, int64_t chunks) {
    ++launches;
    for (int64_t block = 0; block < chunks; ++block) {
      for (int thread = 0; thread < kBlockSize; ++thread) {
        process_chunk<Op>(table, args, static_cast<int32_t>(block), thread);
      }
    }
    return true;
  }
};

// dtype codes of the ctypes interface: 0 fp32, 1 fp64, 2 bf16.
DType host_dtype(int code) {
  return code == 1 ? DType::kFloat64 : code == 2 ? DType::kBFloat16 : DType::kFloat32;
}

// run_sgd / run_adam's dtype loop, with the host's bf16 type.
template <typename TensorDesc, typename MakeGroup>
bool run_groups(const std::vector<TensorDesc>& tensors, MakeGroup make_group) {
  for (const DType dtype : kAllDTypes) {
    if (!contains_dtype(tensors.data(), static_cast<int64_t>(tensors.size()), dtype)) continue;
    auto group = make_group(dtype);
    bool ok = false;
    if (dtype == DType::kFloat32) ok = group.template run<float>();
    if (dtype == DType::kFloat64) ok = group.template run<double>();
    if (dtype == DType::kBFloat16) ok = group.template run<HostBFloat16>();
    if (!ok) return false;
  }
  return true;
}

HyperParam hyper(double value, const void* device_ptr, int device_is_double) {
  return HyperParam{value, device_ptr, device_is_double != 0};
}

}  // namespace

extern "C" {

// launch_sgd over `count` tensors; dtypes[i]: 0 fp32, 1 fp64, 2 bf16. Returns the number of
// launches, or -1 when the launcher refused. `bufs` is null without momentum; lr_ptr null for a
// float lr.
int64_t harness_sgd(int64_t count, const int* dtypes, const int64_t* numels, void* const* params,
                    void* const* grads, void* const* bufs, double lr, const void* lr_ptr,
                    int lr_is_double, double weight_decay, double momentum, double dampening,
                    int nesterov, int maximize, int is_first_step, const float* grad_scale,
                    const float* found_inf) {
  std::vector<SgdTensor> tensors(count);
  for (int64_t i = 0; i < count; ++i) {
    tensors[i] = SgdTensor{host_dtype(dtypes[i]), numels[i], params[i], grads[i],
                           bufs != nullptr ? bufs[i] : nullptr};
  }
  SgdOptions options{};
  options.lr = hyper(lr, lr_ptr, lr_is_double);
  options.weight_decay = weight_decay;
  options.momentum = momentum;
  options.dampening = dampening;
  options.nesterov = nesterov != 0;
  options.maximize = maximize != 0;
  options.is_first_step = is_first_step != 0;
  options.grad_scale = grad_scale;
  options.found_inf = found_inf;
  HostEmulator emulator;
  const SgdArgs args = make_sgd_args(options);
  const bool ok = run_groups(tensors, [&](DType dtype) {
    return SgdGroup<HostEmulator>{tensors.data(), count, dtype, args, emulator};
  });
  return ok ? emulator.launches : -1;
}

// launch_adam likewise. Non-capturable: new_steps[i] is tensor i's step after the increment.
// Capturable (step_ptrs not null): the kernels read the counters (+1) themselves; like the GPU
// path, this does not increment them (launch_increment_steps does, after the math). Each of lr,
// beta1, beta2 and weight_decay is a (value, device pointer or null, pointer is fp64) triple.
int64_t harness_adam(int64_t count, const int* dtypes, const int64_t* numels, void* const* params,
                     void* const* grads, void* const* exp_avgs, void* const* exp_avg_sqs,
                     void* const* max_exp_avg_sqs, const double* new_steps,
                     const void* const* step_ptrs, int steps_are_double, double lr,
                     const void* lr_ptr, int lr_is_double, double beta1, const void* beta1_ptr,
                     int beta1_is_double, double beta2, const void* beta2_ptr, int beta2_is_double,
                     double weight_decay, const void* weight_decay_ptr, int weight_decay_is_double,
                     double eps, int amsgrad, int maximize, int decoupled, const float* grad_scale,
                     const float* found_inf) {
  const bool capturable = step_ptrs != nullptr;
  std::vector<AdamTensor> tensors(count);
  for (int64_t i = 0; i < count; ++i) {
    AdamTensor& t = tensors[i];
    t.dtype = host_dtype(dtypes[i]);
    t.numel = numels[i];
    t.param = params[i];
    t.grad = grads[i];
    t.exp_avg = exp_avgs[i];
    t.exp_avg_sq = exp_avg_sqs[i];
    t.max_exp_avg_sq = amsgrad ? max_exp_avg_sqs[i] : nullptr;
    t.step = capturable ? 0.0 : new_steps[i];
    t.device_step = capturable ? step_ptrs[i] : nullptr;
    t.device_step_is_double = steps_are_double != 0;
  }
  AdamOptions options{};
  options.lr = hyper(lr, lr_ptr, lr_is_double);
  options.beta1 = hyper(beta1, beta1_ptr, beta1_is_double);
  options.beta2 = hyper(beta2, beta2_ptr, beta2_is_double);
  options.weight_decay = hyper(weight_decay, weight_decay_ptr, weight_decay_is_double);
  options.eps = eps;
  options.amsgrad = amsgrad != 0;
  options.maximize = maximize != 0;
  options.decoupled_weight_decay = decoupled != 0;
  options.capturable = capturable;
  options.grad_scale = grad_scale;
  options.found_inf = found_inf;
  HostEmulator emulator;
  if (!betas_usable(options)) return -1;  // as run_adam refuses
  const AdamArgs args = make_adam_args(options);
  const bool ok = run_groups(tensors, [&](DType dtype) {
    return AdamGroup<HostEmulator>{tensors.data(), count, dtype, options, args, emulator};
  });
  return ok ? emulator.launches : -1;
}

int harness_max_tensors_per_launch(int adam, int extra_list) {
  if (adam) {
    return extra_list ? TensorTable<5, HostBiasCorrections>::kMaxTensors
                      : TensorTable<4, HostBiasCorrections>::kMaxTensors;
  }
  return extra_list ? TensorTable<3, NoPerTensorData>::kMaxTensors
                    : TensorTable<2, NoPerTensorData>::kMaxTensors;
}

}  // extern "C"
