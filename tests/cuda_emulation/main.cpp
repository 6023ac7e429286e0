// Runs the source of kernels/warm_average.cu and kernels/warm_member_sums.cu on the CPU
// through include/cuda_shim.h and checks them against plain references: every pair of
// input and output types, M in {2, 3, 8}, odd sizes, aligned and misaligned pointers,
// several grid sizes (the grid-stride loops and the vector/scalar split), the output
// poisoned first. See README.md for what this does and does not show.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_shim.h"

#define WARM_AVERAGE(IN_NAME, TIN, OUT_NAME, TOUT)                                           \
  extern "C" void warm_average_##IN_NAME##_##OUT_NAME(const TIN *const *, const float *,    \
                                                      uint32_t, TOUT *, uint64_t);
#include "../../kernels/warm_average_pairs.inc"
#undef WARM_AVERAGE
extern "C" void warm_member_sums_f32(const float *const *, uint32_t, uint64_t, double *);
extern "C" void warm_member_sums_f16(const __half *const *, uint32_t, uint64_t, double *);
extern "C" void warm_member_sums_bf16(const __nv_bfloat16 *const *, uint32_t, uint64_t,
                                      double *);

namespace {

float to_f32(float x) { return x; }
float to_f32(__half x) { return __half2float(x); }
float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> T from_f32(float x);
template <> float from_f32<float>(float x) { return x; }
template <> __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <typename T> uint32_t bits(T x) {
  uint32_t b = 0;
  std::memcpy(&b, &x, sizeof(T));
  return b;
}
template <typename T> T poison() {
  T p;
  std::memset(&p, 0x5a, sizeof(T));
  return p;
}

// The same generator as `warm gpu-check`: never zero, magnitudes like trained weights.
std::vector<float> seeded(size_t n, uint64_t seed) {
  uint64_t s = (seed * 0x9E3779B97F4A7C15ull) | 1;
  std::vector<float> v(n);
  for (auto &x : v) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    const float unit = float(s >> 40) / float(1u << 24);
    x = ((s & 1) ? -1.0f : 1.0f) * (0.5f + 1.5f * unit) * 0.05f;
  }
  return v;
}

// 16-byte aligned storage for n elements after `shift` leading ones.
template <typename T> struct Buffer {
  std::vector<uint4> storage;
  T *data;
  Buffer(size_t n) : storage((n * sizeof(T) + 15) / 16 + 1), data(reinterpret_cast<T *>(storage.data())) {}
};

constexpr unsigned THREADS = 256;

template <typename I, typename O>
using Average = void (*)(const I *const *, const float *, uint32_t, O *, uint64_t);

template <typename I, typename O>
bool average_pair(const char *name, Average<I, O> kernel) {
  const unsigned lanes = (sizeof(I) == 4 && sizeof(O) == 4) ? 4 : 8;
  int cases = 0;
  std::string failure;
  for (uint32_t m : {2u, 3u, 8u}) {
    for (size_t n : {size_t(1), size_t(7), size_t(1023), size_t(4099), size_t(100003)}) {
      for (size_t shift : {0, 1}) {
        // The launcher's grid (src/cuda/average.rs), and one block to exercise the loops.
        const unsigned launcher = unsigned(std::min<uint64_t>(
            std::max<uint64_t>(((n + lanes - 1) / lanes + THREADS - 1) / THREADS, 1), 8192));
        for (unsigned blocks : {launcher, 1u}) {
          ++cases;
          std::vector<float> weights(m);
          float total = 0;
          for (uint32_t i = 0; i < m; ++i) total += weights[i] = 1.0f + float(i);
          for (auto &w : weights) w /= total;
          std::vector<Buffer<I>> inputs;
          std::vector<const I *> pointers;
          for (uint32_t i = 0; i < m; ++i) {
            inputs.emplace_back(n + shift);
            const auto values = seeded(n + shift, 11 + i);
            for (size_t j = 0; j < n + shift; ++j) inputs.back().data[j] = from_f32<I>(values[j]);
          }
          for (auto &b : inputs) pointers.push_back(b.data + shift);
          Buffer<O> out(n + shift);
          for (size_t j = 0; j < n + shift; ++j) out.data[j] = poison<O>();
          emulation::launch(Dim3{blocks, 1, 1}, Dim3{THREADS, 1, 1}, false, [&] {
            kernel(pointers.data(), weights.data(), m, out.data + shift, n);
          });
          size_t wrong = 0;
          for (size_t j = 0; j < n; ++j) {
            float acc = 0.0f;
            for (uint32_t i = 0; i < m; ++i) acc = std::fmaf(weights[i], to_f32(pointers[i][j]), acc);
            if (bits(out.data[shift + j]) != bits(from_f32<O>(acc))) ++wrong;
          }
          if (shift && bits(out.data[0]) != bits(poison<O>())) ++wrong;
          if (wrong && failure.empty()) {
            failure = "M=" + std::to_string(m) + " n=" + std::to_string(n) +
                      (shift ? " misaligned" : "") + " blocks=" + std::to_string(blocks) + ": " +
                      std::to_string(wrong) + " elements wrong";
          }
        }
      }
    }
  }
  std::printf("| average | %s | %s | %d cases%s%s |\n", name, failure.empty() ? "ok" : "FAIL",
              cases, failure.empty() ? " bit-exact" : "; first: ", failure.c_str());
  return failure.empty();
}

template <typename T>
bool sums_type(const char *name, void (*kernel)(const T *const *, uint32_t, uint64_t, double *)) {
  int cases = 0;
  double worst = 0;
  std::string failure;
  for (uint32_t m : {2u, 3u, 8u}) {
    for (size_t n : {size_t(1), size_t(7), size_t(4099), size_t(100003)}) {
      for (unsigned blocks : {1u, 3u}) {
        ++cases;
        const auto init = seeded(n, 7);
        std::vector<std::vector<T>> inputs(m, std::vector<T>(n));
        for (uint32_t i = 0; i < m; ++i) {
          const auto noise = seeded(n, 11 + i);
          for (size_t j = 0; j < n; ++j) inputs[i][j] = from_f32<T>(init[j] + 0.1f * noise[j]);
        }
        std::vector<double> sums(4 * m, 0.0);
        // Two launches over the two halves, as device fusion adds chunk after chunk.
        const size_t half = n / 2;
        for (auto [from, len] : {std::pair{size_t(0), half}, std::pair{half, n - half}}) {
          if (len == 0) continue;
          std::vector<const T *> pointers;
          for (auto &x : inputs) pointers.push_back(x.data() + from);
          emulation::launch(Dim3{blocks, m, 1}, Dim3{THREADS, 1, 1}, true,
                            [&] { kernel(pointers.data(), m, len, sums.data()); });
        }
        double case_worst = 0;
        for (uint32_t k = 0; k < m; ++k) {
          double want[4] = {0, 0, 0, 0};
          // The scale of d's terms before they cancel: the kernel forms d in f32, and
          // members near each other leave d far smaller than the rounding of (M-1)x and r.
          double d_scale = 0;
          for (size_t j = 0; j < n; ++j) {
            double t = 0;
            for (uint32_t i = 0; i < m; ++i) t += to_f32(inputs[i][j]);
            const double x = to_f32(inputs[k][j]);
            const double r = t - x;
            const double d = double(m - 1) * x - r;
            want[0] += x * x;
            want[1] += x * r;
            want[2] += r * r;
            want[3] += d * d;
            d_scale += std::pow(double(m - 1) * std::fabs(x) + std::fabs(r), 2);
          }
          const double scales[4] = {want[0], std::sqrt(want[0] * want[2]), want[2], d_scale};
          for (int q = 0; q < 4; ++q) {
            double e = std::fabs(sums[4 * k + q] - want[q]) / std::max(scales[q], 1e-300);
            if (std::isnan(e)) e = INFINITY;
            case_worst = std::max(case_worst, e);
          }
        }
        worst = std::max(worst, case_worst);
        if (case_worst > 1e-5 && failure.empty()) {
          failure = "M=" + std::to_string(m) + " n=" + std::to_string(n) + " blocks=" +
                    std::to_string(blocks) + ": relative error " + std::to_string(case_worst);
        }
      }
    }
  }
  std::printf("| member sums | %s | %s | %d cases, max relative error %.1e (tolerance 1e-5)%s%s |\n",
              name, failure.empty() ? "ok" : "FAIL", cases, worst, failure.empty() ? "" : "; first: ",
              failure.c_str());
  return failure.empty();
}

} // namespace

int main() {
  std::printf("| kernel | types | result | detail |\n|---|---|---|---|\n");
  bool ok = true;
#define WARM_AVERAGE(IN_NAME, TIN, OUT_NAME, TOUT)                                           \
  ok &= average_pair<TIN, TOUT>(#IN_NAME " -> " #OUT_NAME, warm_average_##IN_NAME##_##OUT_NAME);
#include "../../kernels/warm_average_pairs.inc"
#undef WARM_AVERAGE
  ok &= sums_type<float>("f32", warm_member_sums_f32);
  ok &= sums_type<__half>("f16", warm_member_sums_f16);
  ok &= sums_type<__nv_bfloat16>("bf16", warm_member_sums_bf16);
  std::printf("emulated kernels: %s\n", ok ? "all passed" : "FAILURES above");
  return ok ? 0 : 1;
}
