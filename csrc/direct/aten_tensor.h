// The step's Access (step_impl.h) for at::Tensor: the direct entry points of the accelerator
// fused_opt._C_direct, which read tensors straight from Python lists and so skip the
// dispatcher, and with it what it would resolve: lazy neg/conj views and wrapper tensors are
// refused here, and the in-place updates are counted here.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include "../cpu/kernel_api.h"

namespace fused_opt_cpu {

// The kernel table fused_opt._C chose (its capsule `_active_kernels`), set when the module loads.
extern const KernelTable* (*direct_active_kernels)();

// Starts loading a TensorImpl (about four cache lines) ahead of use: the metadata of thousands of
// small tensors is out of the caches after a backward pass.
inline void prefetch_tensor_impl(const c10::TensorImpl* impl) {
  for (int line = 0; line < 4; ++line)
    __builtin_prefetch(reinterpret_cast<const char*>(impl) + 64 * line);
}

struct AtenAccess {
  using Tensor = at::Tensor;

  static const KernelTable& kernels() { return *direct_active_kernels(); }

  // Tensors whose memory the kernels may not read as plain values: views with a lazy negation
  // or conjugation bit, and tensors of Python/functorch subclasses that only wrap others.
  static bool plain_memory(const Tensor& t) {
    const c10::DispatchKeySet keys = t.key_set();
    return !t.is_neg() && !t.is_conj() && !keys.has(c10::DispatchKey::Python) &&
           !keys.has(c10::DispatchKey::FuncTorchBatched) &&
           !keys.has(c10::DispatchKey::Functionalize) && t.has_storage();
  }
  static bool strided(const Tensor& t) { return t.layout() == at::kStrided; }
  static bool dense(const Tensor& t) {
    return t.is_contiguous() || t.is_non_overlapping_and_dense();
  }

  // In-place updates must be visible to autograd's saved-tensor checks, as torch.optim's are.
  static void bump_version(const Tensor& t) {
    if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
  }

  // Starts loading, for writing, the counter that bump_version(t) increments: a heap object of
  // its own per tensor, out of the caches once the step before has streamed its data through
  // them. The bumps are atomic increments, which x86 does not overlap by itself. The counter's
  // address is read from VariableVersion, whose one member is the pointer to it; should a torch
  // release change that, nothing is prefetched (a prefetch never faults, whatever the address).
  static void prefetch_version_counter(const Tensor& t) {
    if constexpr (sizeof(c10::VariableVersion) == sizeof(void*)) {
      const c10::VariableVersion& version = t.unsafeGetTensorImpl()->version_counter();
      if (const void* counter = *reinterpret_cast<const void* const*>(&version))
        __builtin_prefetch(counter, /*rw=*/1);
    }
  }

  // Level 0: the TensorImpl; level 1: the StorageImpl it points to.
  static void prefetch_metadata(const Tensor& t, int level) {
    if (level == 0) {
      prefetch_tensor_impl(t.unsafeGetTensorImpl());
    } else if (t.has_storage()) {
      __builtin_prefetch(t.storage().unsafeGetStorageImpl());
    }
  }

  static Tensor empty_like(const Tensor& t) {
    return at::empty_like(t, at::MemoryFormat::Preserve);
  }
  static void copy(const Tensor& dst, const Tensor& src) { dst.copy_(src); }
  // Below the version counting: the plan has counted the step's update once.
  static void copy_uncounted(const Tensor& dst, const Tensor& src) {
    at::AutoDispatchBelowADInplaceOrView uncounted;
    dst.copy_(src);
  }

  static double item(const Tensor& t) { return t.item<double>(); }

  static int64_t num_threads() { return at::get_num_threads(); }
  static bool in_parallel_region() { return at::in_parallel_region(); }
  template <typename F>
  static void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
    at::parallel_for(begin, end, grain, f);
  }
};

}  // namespace fused_opt_cpu
