// multi_tensor_apply: one kernel launch updates chunks of many tensors.
//
// Metadata travels in the kernel arguments. CUDA 12.1+ on Volta and newer accepts 32764 bytes of
// kernel parameters (4 KB before), so one launch carries hundreds of tensors (see
// TensorTable::kMaxTensors) instead of torch's few dozen: for a typical model the whole
// (device, dtype) group of a step is one launch, and the launch count never depends on tensor
// sizes because no per-block table is needed:
//
//   ptrs[list][t]      the t-th tensor of each list (param, grad, state...)
//   numels[t]          its element count
//   per_tensor[t]      the op's per-tensor data (Adam: bias corrections or the step pointer)
//   chunk_begin[t]     prefix sum of the chunk counts; block b owns the chunk b, found by a binary
//                      search over chunk_begin (uniform within a block, reads the constant bank)
//
// Each block processes one chunk of kChunkSize elements: 16-byte vector loads/stores when every
// list's pointer is 16-byte aligned (chunk starts keep the base alignment), kIlp independent
// vectors in flight per thread, and a scalar path for the ragged tail or unaligned tensors.
// Math runs in the op's compute type: float for fp32/fp16/bf16, double for fp64.
//
// Everything but the kernel itself is also plain C++ for a host compiler (fp32 and fp64 only):
// csrc/cuda/testing/host_harness.cpp runs process_chunk for every (chunk, thread) of each packed
// table, which is what a launch does, so the GPU-less tests cover packing and chunk logic too.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include "optimizer_math.cuh"

#if defined(__CUDA_ARCH__)  // the device pass; the host pass (and g++) ignores unrolling hints
#define FUSED_OPT_UNROLL _Pragma("unroll")
#else
#define FUSED_OPT_UNROLL
#endif

namespace fused_opt {
namespace cuda {

constexpr int kBlockSize = 256;
constexpr int kIlp = 4;
// At least two resident blocks per SM caps registers at 128 per thread, leaving enough warps to
// keep the loads of 4 x 16 bytes per list and thread in flight.
constexpr int kMinBlocksPerSm = 2;
constexpr int64_t kChunkSize = 65536;
constexpr int64_t kMaxChunksPerLaunch = 2147483647;  // gridDim.x limit (and int32 chunk_begin)

#if defined(__CUDACC__) && CUDART_VERSION < 12010
constexpr size_t kKernelParamBytes = 4096;
#else
constexpr size_t kKernelParamBytes = 32764;  // Volta+ with CUDA 12.1+
#endif
// Kept free for the op's own argument struct (hyper-parameters, scalar pointers).
constexpr size_t kOpArgsBytes = 256;

template <int kLists, typename PerTensor>
struct TensorTable {
  static constexpr size_t kBytesPerTensor =
      kLists * sizeof(void*) + sizeof(int64_t) + sizeof(PerTensor) + sizeof(int32_t);
  static constexpr int kMaxTensors =
      static_cast<int>((kKernelParamBytes - kOpArgsBytes - 16) / kBytesPerTensor);

  void* ptrs[kLists][kMaxTensors];
  int64_t numels[kMaxTensors];
  PerTensor per_tensor[kMaxTensors];
  int32_t chunk_begin[kMaxTensors + 1];
  int32_t num_tensors;
};

struct NoPerTensorData {};

// ---- storage <-> compute conversions (round to nearest even on store) -------------------------
template <typename T>
struct ComputeTypeOf {
  using type = float;
};
template <>
struct ComputeTypeOf<double> {
  using type = double;
};

FUSED_OPT_HOST_DEVICE float to_compute(float x) { return x; }
FUSED_OPT_HOST_DEVICE double to_compute(double x) { return x; }

template <typename T>
FUSED_OPT_HOST_DEVICE T from_compute(typename ComputeTypeOf<T>::type x);
template <>
FUSED_OPT_HOST_DEVICE float from_compute<float>(float x) {
  return x;
}
template <>
FUSED_OPT_HOST_DEVICE double from_compute<double>(double x) {
  return x;
}

#if defined(__CUDACC__)  // cuda_fp16.h / cuda_bf16.h conversions work on both sides
FUSED_OPT_HOST_DEVICE float to_compute(__half x) { return __half2float(x); }
FUSED_OPT_HOST_DEVICE float to_compute(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
FUSED_OPT_HOST_DEVICE __half from_compute<__half>(float x) {
  return __float2half_rn(x);
}
template <>
FUSED_OPT_HOST_DEVICE __nv_bfloat16 from_compute<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
#endif

template <typename T>
struct alignas(16) Vector16 {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// ---- one chunk, as seen by one thread ---------------------------------------------------------
// Op provides: Storage, Compute, kLists, writes(list), and operator()(Compute (&x)[kLists]).
template <typename Op>
FUSED_OPT_HOST_DEVICE void apply_chunk(const Op& op,
                                       typename Op::Storage* const (&ptrs)[Op::kLists], int64_t n,
                                       int thread) {
  using T = typename Op::Storage;
  using C = typename Op::Compute;
  constexpr int L = Op::kLists;
  using Vec = Vector16<T>;
  constexpr int kVec = Vec::kSize;
  // Same elements per thread and iteration for every dtype: 16-bit vectors carry 8 elements, so
  // half as many are in flight (which also keeps amsgrad's five lists out of local memory).
  constexpr int kVecIlp = kVec > 4 ? kIlp * 4 / kVec : kIlp;

  bool aligned = true;
  FUSED_OPT_UNROLL
  for (int l = 0; l < L; ++l) aligned &= (reinterpret_cast<uintptr_t>(ptrs[l]) % 16 == 0);

  int64_t scalar_begin = 0;
  if (aligned) {
    const int64_t num_vectors = n / kVec;
    for (int64_t base = thread; base < num_vectors; base += int64_t(kBlockSize) * kVecIlp) {
      Vec r[kVecIlp][L];
      FUSED_OPT_UNROLL
      for (int k = 0; k < kVecIlp; ++k) {
        const int64_t i = base + int64_t(k) * kBlockSize;
        if (i < num_vectors) {
          FUSED_OPT_UNROLL
          for (int l = 0; l < L; ++l) r[k][l] = reinterpret_cast<const Vec*>(ptrs[l])[i];
        }
      }
      FUSED_OPT_UNROLL
      for (int k = 0; k < kVecIlp; ++k) {
        const int64_t i = base + int64_t(k) * kBlockSize;
        if (i < num_vectors) {
          FUSED_OPT_UNROLL
          for (int e = 0; e < kVec; ++e) {
            C x[L];
            FUSED_OPT_UNROLL
            for (int l = 0; l < L; ++l) x[l] = to_compute(r[k][l].v[e]);
            op(x);
            FUSED_OPT_UNROLL
            for (int l = 0; l < L; ++l)
              if (Op::writes(l)) r[k][l].v[e] = from_compute<T>(x[l]);
          }
          FUSED_OPT_UNROLL
          for (int l = 0; l < L; ++l)
            if (Op::writes(l)) reinterpret_cast<Vec*>(ptrs[l])[i] = r[k][l];
        }
      }
    }
    scalar_begin = num_vectors * kVec;
  }

  // The ragged tail of an aligned chunk, or the whole chunk when some pointer is unaligned.
  for (int64_t base = scalar_begin + thread; base < n; base += int64_t(kBlockSize) * kIlp) {
    C x[kIlp][L];
    FUSED_OPT_UNROLL
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + int64_t(k) * kBlockSize;
      if (i < n) {
        FUSED_OPT_UNROLL
        for (int l = 0; l < L; ++l) x[k][l] = to_compute(ptrs[l][i]);
      }
    }
    FUSED_OPT_UNROLL
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + int64_t(k) * kBlockSize;
      if (i < n) {
        op(x[k]);
        FUSED_OPT_UNROLL
        for (int l = 0; l < L; ++l)
          if (Op::writes(l)) ptrs[l][i] = from_compute<T>(x[k][l]);
      }
    }
  }
}

// The tensor that owns `chunk`: the last one whose first chunk is <= chunk.
template <typename Table>
FUSED_OPT_HOST_DEVICE int tensor_of_chunk(const Table& table, int32_t chunk) {
  int lo = 0;
  int hi = table.num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.chunk_begin[mid] <= chunk) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// What thread `thread` of the block for `chunk` does. Op::Args must have a
// `const float* found_inf`: when it points to a non-zero value nothing changes. Op is built per
// block from the args and its tensor's data.
template <typename Op>
FUSED_OPT_HOST_DEVICE void process_chunk(
    const TensorTable<Op::kLists, typename Op::PerTensor>& table, const typename Op::Args& args,
    int32_t chunk, int thread) {
  if (args.found_inf != nullptr && *args.found_inf != 0.0f) return;
  const int t = tensor_of_chunk(table, chunk);
  const int64_t begin = int64_t(chunk - table.chunk_begin[t]) * kChunkSize;
  const int64_t remaining = table.numels[t] - begin;
  const int64_t n = remaining < kChunkSize ? remaining : kChunkSize;

  using T = typename Op::Storage;
  T* ptrs[Op::kLists];
  FUSED_OPT_UNROLL
  for (int l = 0; l < Op::kLists; ++l) ptrs[l] = static_cast<T*>(table.ptrs[l][t]) + begin;

  const Op op(args, table.per_tensor[t]);
  apply_chunk(op, ptrs, n, thread);
}

#if defined(__CUDACC__)
template <typename Op>
__global__ void __launch_bounds__(kBlockSize, kMinBlocksPerSm) multi_tensor_apply_kernel(
    const __grid_constant__ TensorTable<Op::kLists, typename Op::PerTensor> table,
    const __grid_constant__ typename Op::Args args) {
  process_chunk<Op>(table, args, static_cast<int32_t>(blockIdx.x), static_cast<int>(threadIdx.x));
}

// Launches each packed table on `stream` and keeps the first launch error.
struct GpuLauncher {
  cudaStream_t stream;
  cudaError_t error = cudaSuccess;

  template <typename Op>
  bool launch(const TensorTable<Op::kLists, typename Op::PerTensor>& table,
              const typename Op::Args& args, int64_t chunks) {
    multi_tensor_apply_kernel<Op>
        <<<static_cast<unsigned>(chunks), kBlockSize, 0, stream>>>(table, args);
    error = cudaGetLastError();
    return error == cudaSuccess;
  }

  // The launchers' result: the launch error, or invalid value when packing failed.
  cudaError_t result(bool ok) const {
    if (ok) return cudaSuccess;
    return error != cudaSuccess ? error : cudaErrorInvalidValue;
  }
};
#endif

// What one tensor contributes to a launch.
template <int kLists, typename PerTensor>
struct TensorSlot {
  void* ptrs[kLists];
  int64_t numel;
  PerTensor per_tensor;
};

// Packs the tensors i in [0, count) for which describe(i, slot) returns true (the caller's dtype
// filter) into as few tables as the kernel-argument space allows and hands each full table to
// launcher.launch<Op>(table, args, chunks). Empty tensors are skipped. Returns false when a
// launch fails or a tensor has more chunks than a grid can hold.
template <typename Op, typename Describe, typename Launcher>
bool launch_multi_tensor(int64_t count, Describe describe, const typename Op::Args& args,
                         Launcher& launcher) {
  using Table = TensorTable<Op::kLists, typename Op::PerTensor>;
  static_assert(sizeof(typename Op::Args) <= kOpArgsBytes, "op arguments outgrew their reserve");
  static_assert(sizeof(Table) + sizeof(typename Op::Args) <= kKernelParamBytes,
                "kernel arguments exceed the parameter space");

  Table table;
  table.num_tensors = 0;
  int64_t chunks = 0;
  auto flush = [&]() {
    if (table.num_tensors == 0) return true;
    table.chunk_begin[table.num_tensors] = static_cast<int32_t>(chunks);
    const bool ok = launcher.template launch<Op>(table, args, chunks);
    table.num_tensors = 0;
    chunks = 0;
    return ok;
  };

  for (int64_t i = 0; i < count; ++i) {
    TensorSlot<Op::kLists, typename Op::PerTensor> slot;
    if (!describe(i, slot) || slot.numel == 0) continue;
    const int64_t tensor_chunks = (slot.numel + kChunkSize - 1) / kChunkSize;
    if (tensor_chunks > kMaxChunksPerLaunch) return false;
    if (table.num_tensors == Table::kMaxTensors || chunks + tensor_chunks > kMaxChunksPerLaunch) {
      if (!flush()) return false;
    }
    const int t = table.num_tensors++;
    for (int l = 0; l < Op::kLists; ++l) table.ptrs[l][t] = slot.ptrs[l];
    table.numels[t] = slot.numel;
    table.per_tensor[t] = slot.per_tensor;
    table.chunk_begin[t] = static_cast<int32_t>(chunks);
    chunks += tensor_chunks;
  }
  return flush();
}

}  // namespace cuda
}  // namespace fused_opt
