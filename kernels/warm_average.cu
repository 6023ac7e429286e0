// Weighted average of M tensors on the GPU: out[j] = sum_i w[i] * x_i[j].
//
// One kernel per pair of input and output types (f32, f16, bf16: the members' stored type
// and the served one, so f32 checkpoints are averaged straight into a bf16 model). Sums
// are kept in f32 and rounded once to the output type (round to nearest even), as warm's
// CPU fusion does. M is any count: the input pointers and the weights are arrays in
// device memory. Where the output and every input are 16-byte aligned, each thread moves
// whole 16-byte vectors (4 elements when both types are f32, else 8: one or two vectors
// per input and for the output) and a scalar pass covers the tail; otherwise the whole
// range runs scalar. Nothing assumes the length is a multiple of anything.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T narrow(float x);
template <> __device__ __forceinline__ float narrow<float>(float x) { return x; }
template <> __device__ __forceinline__ __half narrow<__half>(float x) {
  return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename TIn, typename TOut>
__device__ __forceinline__ bool all_aligned(const TIn *const *inputs, uint32_t m,
                                            const TOut *out) {
  uintptr_t bits = reinterpret_cast<uintptr_t>(out);
  for (uint32_t i = 0; i < m; ++i) {
    bits |= reinterpret_cast<uintptr_t>(inputs[i]);
  }
  return (bits & 15u) == 0;
}

template <typename TIn, typename TOut>
__device__ __forceinline__ void average(const TIn *const *__restrict__ inputs,
                                        const float *__restrict__ weights, uint32_t m,
                                        TOut *__restrict__ out, uint64_t n) {
  constexpr uint32_t LANES = (sizeof(TIn) == 4 && sizeof(TOut) == 4) ? 4 : 8;
  constexpr uint32_t IN_VECTORS = LANES * sizeof(TIn) / 16;
  constexpr uint32_t OUT_VECTORS = LANES * sizeof(TOut) / 16;
  const uint64_t thread = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const uint64_t stride = uint64_t(gridDim.x) * blockDim.x;

  uint64_t scalar_from = 0;
  if (all_aligned(inputs, m, out)) {
    const uint64_t vectors = n / LANES;
    for (uint64_t v = thread; v < vectors; v += stride) {
      float acc[LANES];
#pragma unroll
      for (uint32_t k = 0; k < LANES; ++k) acc[k] = 0.0f;
      for (uint32_t i = 0; i < m; ++i) {
        // memcpy, not a pointer cast, moves the vector's bytes into typed elements: a cast
        // would read a uint4 object as TIn (undefined; g++ -O2 drops such stores).
        TIn x[LANES];
#pragma unroll
        for (uint32_t q = 0; q < IN_VECTORS; ++q) {
          const uint4 raw = __ldg(reinterpret_cast<const uint4 *>(inputs[i]) + v * IN_VECTORS + q);
          memcpy(&x[q * (LANES / IN_VECTORS)], &raw, 16);
        }
        const float w = weights[i];
#pragma unroll
        for (uint32_t k = 0; k < LANES; ++k) acc[k] = fmaf(w, widen(x[k]), acc[k]);
      }
      TOut y[LANES];
#pragma unroll
      for (uint32_t k = 0; k < LANES; ++k) y[k] = narrow<TOut>(acc[k]);
#pragma unroll
      for (uint32_t q = 0; q < OUT_VECTORS; ++q) {
        uint4 packed;
        memcpy(&packed, &y[q * (LANES / OUT_VECTORS)], 16);
        reinterpret_cast<uint4 *>(out)[v * OUT_VECTORS + q] = packed;
      }
    }
    scalar_from = vectors * LANES;
  }
  for (uint64_t j = scalar_from + thread; j < n; j += stride) {
    float acc = 0.0f;
    for (uint32_t i = 0; i < m; ++i) acc = fmaf(weights[i], widen(inputs[i][j]), acc);
    out[j] = narrow<TOut>(acc);
  }
}

} // namespace

// warm_average_<input>_<output>(const TIn *const *inputs, const float *weights, uint32_t m,
//                               TOut *out, uint64_t n)
#define WARM_AVERAGE(IN_NAME, TIN, OUT_NAME, TOUT)                                          \
  extern "C" __global__ void warm_average_##IN_NAME##_##OUT_NAME(                           \
      const TIN *const *inputs, const float *weights, uint32_t m, TOUT *out, uint64_t n) { \
    average<TIN, TOUT>(inputs, weights, m, out, n);                                         \
  }

#include "warm_average_pairs.inc"
#undef WARM_AVERAGE
