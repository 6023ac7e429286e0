// Emulation of the parts of CUDA's cuda_fp16.h that kernels/*.cu use, for running the
// kernels' source on the CPU (see ../README.md). Conversions round to nearest even, as
// CUDA's __float2half_rn does; _Float16 does the arithmetic.
#pragma once
#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};

inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.bits, 2);
  return static_cast<float>(v);
}

inline __half __float2half_rn(float f) {
  _Float16 v = static_cast<_Float16>(f);
  __half h;
  std::memcpy(&h.bits, &v, 2);
  return h;
}
