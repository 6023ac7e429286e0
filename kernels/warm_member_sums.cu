// Shared-init statistics of M members over one range of a tensor, on the GPU: for member
// k, with t = sum_i x_i (unweighted), r = t - x_k (the other members' total) and
// d = (M-1) x_k - r, it adds the sums of x_k*x_k, x_k*r, r*r and d*d over the range to
// sums[4k .. 4k+4] (f64). These are the CPU pass's four sums (src/fuse/kernel.rs): the
// cosine of each member to the mean of the others and its distance to it come from them.
//
// Grid: x covers the range, y is the member. Each thread sums its elements in f32, the
// block reduces in f64 and one thread per block adds to the f64 totals atomically (the
// order of the additions varies, so the last bits do too: these are diagnostics, not
// weights). Non-finite data (or squares beyond f32) makes the sums non-finite; the host
// then scans that tensor exactly, as the CPU pass does. Reads are scalar: the member
// total is read M times per element, which the GPU's memory does far faster than PCIe
// delivers the data.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

constexpr uint32_t THREADS = 256;
constexpr uint32_t WARPS = THREADS / 32;

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ void member_sums(const T *const *__restrict__ inputs, uint32_t m,
                                            uint64_t n, double *__restrict__ sums) {
  const uint32_t k = blockIdx.y;
  const uint64_t stride = uint64_t(gridDim.x) * blockDim.x;
  const float others = float(m - 1);
  const T *__restrict__ own = inputs[k];
  float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (uint64_t j = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    float t = 0.0f;
    for (uint32_t i = 0; i < m; ++i) t += widen(inputs[i][j]);
    const float x = widen(own[j]);
    const float r = t - x;
    const float d = others * x - r;
    s[0] = fmaf(x, x, s[0]);
    s[1] = fmaf(x, r, s[1]);
    s[2] = fmaf(r, r, s[2]);
    s[3] = fmaf(d, d, s[3]);
  }
  __shared__ double partial[4][WARPS];
  const uint32_t lane = threadIdx.x % 32;
  const uint32_t warp = threadIdx.x / 32;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const double v = warp_sum(double(s[q]));
    if (lane == 0) partial[q][warp] = v;
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const double v = warp_sum(lane < WARPS ? partial[q][lane] : 0.0);
      if (lane == 0) atomicAdd(&sums[4 * k + q], v);
    }
  }
}

} // namespace

// Launched with blockDim.x == 256 (THREADS) and gridDim.y == m.
extern "C" __global__ void __launch_bounds__(THREADS)
    warm_member_sums_f32(const float *const *inputs, uint32_t m, uint64_t n, double *sums) {
  member_sums<float>(inputs, m, n, sums);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    warm_member_sums_f16(const __half *const *inputs, uint32_t m, uint64_t n, double *sums) {
  member_sums<__half>(inputs, m, n, sums);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    warm_member_sums_bf16(const __nv_bfloat16 *const *inputs, uint32_t m, uint64_t n,
                          double *sums) {
  member_sums<__nv_bfloat16>(inputs, m, n, sums);
}
