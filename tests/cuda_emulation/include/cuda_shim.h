// CUDA's execution model emulated with threads, to run kernels/*.cu on the CPU (see
// ../README.md). Each block runs on its own OS threads (one per CUDA thread) with real
// barriers for __syncthreads and warp shuffles; blocks run one after another, so a
// `__shared__` (static) array is private to the running block.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

inline thread_local Dim3 threadIdx;
inline thread_local Dim3 blockIdx;
inline Dim3 blockDim;
inline Dim3 gridDim;

namespace emulation {
inline std::unique_ptr<std::barrier<>> block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline std::vector<uint64_t> shuffle_slots;
inline std::mutex atomic_lock;

// Runs `kernel` over the grid. `threads`: one OS thread per CUDA thread (needed by kernels
// that synchronize); otherwise each block's threads run in turn on this thread.
inline void launch(Dim3 grid, Dim3 block, bool threads, const std::function<void()> &kernel) {
  gridDim = grid;
  blockDim = block;
  const unsigned warps = (block.x + 31) / 32;
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      if (!threads) {
        for (unsigned t = 0; t < block.x; ++t) {
          threadIdx = Dim3{t, 0, 0};
          blockIdx = Dim3{bx, by, 0};
          kernel();
        }
        continue;
      }
      block_barrier = std::make_unique<std::barrier<>>(block.x);
      warp_barriers.clear();
      for (unsigned w = 0; w < warps; ++w) {
        const unsigned lanes = std::min(32u, block.x - 32 * w);
        warp_barriers.push_back(std::make_unique<std::barrier<>>(lanes));
      }
      shuffle_slots.assign(32 * warps, 0);
      std::vector<std::thread> running;
      for (unsigned t = 0; t < block.x; ++t) {
        running.emplace_back([=, &kernel] {
          threadIdx = Dim3{t, 0, 0};
          blockIdx = Dim3{bx, by, 0};
          kernel();
        });
      }
      for (auto &t : running) t.join();
    }
  }
}
} // namespace emulation

inline void __syncthreads() { emulation::block_barrier->arrive_and_wait(); }

template <typename T> inline T __shfl_down_sync(unsigned, T value, int offset) {
  static_assert(sizeof(T) <= 8);
  const unsigned lane = threadIdx.x % 32;
  const unsigned warp = threadIdx.x / 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  emulation::shuffle_slots[32 * warp + lane] = bits;
  emulation::warp_barriers[warp]->arrive_and_wait();
  T result = value;
  if (lane + offset < 32) {
    std::memcpy(&result, &emulation::shuffle_slots[32 * warp + lane + offset], sizeof(T));
  }
  emulation::warp_barriers[warp]->arrive_and_wait();
  return result;
}

inline double atomicAdd(double *address, double value) {
  std::lock_guard<std::mutex> guard(emulation::atomic_lock);
  const double old = *address;
  *address = old + value;
  return old;
}

template <typename T> inline T __ldg(const T *p) { return *p; }
