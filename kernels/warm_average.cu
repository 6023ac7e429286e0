// Weighted average of M tensors on the GPU: out[j] = sum_i w[i] * x_i[j].
//
// One kernel per dtype (f32, f16, bf16). Sums are kept in f32 and rounded once to the
// output dtype (round to nearest even), as warm's CPU fusion does. M is any count: the
// input pointers and the weights are arrays in device memory. Where the output and every
// input are 16-byte aligned, each thread moves 16 bytes per load and store (4 f32 or
// 8 halves) and a scalar pass covers the tail; otherwise the whole range runs scalar.
// Nothing assumes the length is a multiple of anything.

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

template <typename T>
__device__ __forceinline__ bool all_aligned(const T *const *inputs, uint32_t m, const T *out) {
  uintptr_t bits = reinterpret_cast<uintptr_t>(out);
  for (uint32_t i = 0; i < m; ++i) {
    bits |= reinterpret_cast<uintptr_t>(inputs[i]);
  }
  return (bits & 15u) == 0;
}

template <typename T>
__device__ __forceinline__ void average(const T *const *__restrict__ inputs,
                                        const float *__restrict__ weights, uint32_t m,
                                        T *__restrict__ out, uint64_t n) {
  constexpr uint32_t LANES = 16 / sizeof(T);
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
        const uint4 raw = __ldg(reinterpret_cast<const uint4 *>(inputs[i]) + v);
        const T *x = reinterpret_cast<const T *>(&raw);
        const float w = weights[i];
#pragma unroll
        for (uint32_t k = 0; k < LANES; ++k) acc[k] = fmaf(w, widen(x[k]), acc[k]);
      }
      uint4 packed;
      T *y = reinterpret_cast<T *>(&packed);
#pragma unroll
      for (uint32_t k = 0; k < LANES; ++k) y[k] = narrow<T>(acc[k]);
      reinterpret_cast<uint4 *>(out)[v] = packed;
    }
    scalar_from = vectors * LANES;
  }
  for (uint64_t j = scalar_from + thread; j < n; j += stride) {
    float acc = 0.0f;
    for (uint32_t i = 0; i < m; ++i) acc = fmaf(weights[i], widen(inputs[i][j]), acc);
    out[j] = narrow<T>(acc);
  }
}

} // namespace

extern "C" __global__ void warm_average_f32(const float *const *inputs, const float *weights,
                                            uint32_t m, float *out, uint64_t n) {
  average<float>(inputs, weights, m, out, n);
}

extern "C" __global__ void warm_average_f16(const __half *const *inputs, const float *weights,
                                            uint32_t m, __half *out, uint64_t n) {
  average<__half>(inputs, weights, m, out, n);
}

extern "C" __global__ void warm_average_bf16(const __nv_bfloat16 *const *inputs,
                                             const float *weights, uint32_t m,
                                             __nv_bfloat16 *out, uint64_t n) {
  average<__nv_bfloat16>(inputs, weights, m, out, n);
}
