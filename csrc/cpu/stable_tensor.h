// The step's Access (step_impl.h) for torch::stable::Tensor: the dispatcher kernels of
// fused_opt._C, on torch's stable ABI.
//
// What the stable ABI does not offer is not needed here: the dispatcher resolves lazy neg/conj
// views and tensor subclasses before the CPU kernel runs, and the op's ADInplaceOrView kernel
// (fused_opt/_ops.py) counts the in-place updates for autograd.
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <exception>
#include <mutex>
#include <numeric>

#include "isa.h"

namespace fused_opt_cpu {

struct StableAccess {
  using Tensor = torch::stable::Tensor;

  static const KernelTable& kernels() { return active_kernels(); }
  static bool plain_memory(const Tensor&) { return true; }
  static bool strided(const Tensor& t) { return t.layout() == torch::headeronly::Layout::Strided; }

  // Contiguous, or a permutation of a contiguous tensor (channels_last): sorted by stride, each
  // dimension's stride is the product of the sizes below it (dimensions of size 1 aside).
  static bool dense(const Tensor& t) {
    if (t.is_contiguous()) return true;
    const auto sizes = t.sizes();
    const auto strides = t.strides();
    int64_t order[16];
    const int64_t dims = static_cast<int64_t>(sizes.size());
    if (dims > 16) return false;
    std::iota(order, order + dims, int64_t{0});
    const auto key = [&](int64_t d) { return sizes[d] < 2 ? int64_t{-1} : strides[d]; };
    std::sort(order, order + dims, [&](int64_t a, int64_t b) { return key(a) < key(b); });
    int64_t expected = 1;
    for (int64_t d = 0; d < dims; ++d) {
      const int64_t dim = order[d];
      if (sizes[dim] == 1) continue;
      if (strides[dim] != expected) return false;
      expected *= sizes[dim];
    }
    return true;
  }

  static void bump_version(const Tensor&) {}
  static void prefetch_version_counter(const Tensor&) {}
  static void prefetch_metadata(const Tensor&, int) {}

  static Tensor empty_like(const Tensor& t) { return torch::stable::empty_like(t); }
  static void copy(const Tensor& dst, const Tensor& src) {
    Tensor target = dst;
    torch::stable::copy_(target, src);
  }
  static void copy_uncounted(const Tensor& dst, const Tensor& src) { copy(dst, src); }

  static double item(const Tensor& t) {
    if (t.is_cpu() && t.scalar_type() == torch::headeronly::ScalarType::Double)
      return *static_cast<const double*>(t.const_data_ptr());
    const Tensor value =
        torch::stable::to(t, torch::headeronly::ScalarType::Double, std::nullopt,
                          torch::stable::Device(torch::headeronly::DeviceType::CPU));
    return *static_cast<const double*>(value.const_data_ptr());
  }

  static int64_t num_threads() { return torch::stable::get_num_threads(); }
  // torch's parallel_for runs its body inline when called inside a parallel region.
  static bool in_parallel_region() { return false; }
  // An exception may not cross the C ABI of torch's thread pool (it would arrive as a bare
  // error code): the first one a thread throws is carried over and rethrown here.
  template <typename F>
  static void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
    std::exception_ptr error;
    std::mutex first;
    torch::stable::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
      try {
        f(b, e);
      } catch (...) {
        const std::lock_guard<std::mutex> lock(first);
        if (!error) error = std::current_exception();
      }
    });
    if (error) std::rethrow_exception(error);
  }
};

}  // namespace fused_opt_cpu
