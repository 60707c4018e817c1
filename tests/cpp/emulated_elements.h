// The element types the emulated kernel tests run, with their dtype tag and conversions through
// float64.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "cuda/launch.h"

namespace block_attn::emulated_test {

template <typename T>
struct Element;
template <>
struct Element<__nv_bfloat16> {
  static constexpr cuda::DType kDType = cuda::DType::kBFloat16;
  static constexpr const char* kName = "bf16";
  static __nv_bfloat16 from(double x) { return __float2bfloat16_rn(static_cast<float>(x)); }
  static double to(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __nv_bfloat16 nan() { return __float2bfloat16_rn(NAN); }
};
template <>
struct Element<__half> {
  static constexpr cuda::DType kDType = cuda::DType::kFloat16;
  static constexpr const char* kName = "fp16";
  static __half from(double x) { return __float2half_rn(static_cast<float>(x)); }
  static double to(__half x) { return __half2float(x); }
  static __half nan() { return __float2half_rn(NAN); }
};
template <>
struct Element<float> {
  static constexpr cuda::DType kDType = cuda::DType::kFloat32;
  static constexpr const char* kName = "fp32";
  static float from(double x) { return static_cast<float>(x); }
  static double to(float x) { return x; }
  static float nan() { return NAN; }
};
template <>
struct Element<double> {
  static constexpr cuda::DType kDType = cuda::DType::kFloat64;
  static constexpr const char* kName = "fp64";
  static double from(double x) { return x; }
  static double to(double x) { return x; }
  static double nan() { return NAN; }
};

}  // namespace block_attn::emulated_test
