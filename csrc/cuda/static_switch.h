// Turns runtime choices (dtype, head dim, causal) into template parameters, FlashAttention style:
//   BOOL_SWITCH(params.is_causal, kIsCausal, [&] { return run<kIsCausal>(params); });
// The lambda's return value is the switch's value.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define BOOL_SWITCH(COND, CONST_NAME, ...)      \
  [&] {                                         \
    if (COND) {                                 \
      constexpr static bool CONST_NAME = true;  \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                     \
    }                                           \
  }()

// DTYPE is a block_attn::cuda::DType; TYPE_NAME becomes the element type and the lambda returns a
// cudaError_t. A value outside the enumeration returns cudaErrorInvalidValue, never a guessed
// type; with no default case the compiler flags an enumerator added without a case.
#define DTYPE_SWITCH(DTYPE, TYPE_NAME, ...)        \
  [&]() -> cudaError_t {                           \
    switch (DTYPE) {                               \
      case ::block_attn::cuda::DType::kFloat32: {  \
        using TYPE_NAME = float;                   \
        return __VA_ARGS__();                      \
      }                                            \
      case ::block_attn::cuda::DType::kFloat64: {  \
        using TYPE_NAME = double;                  \
        return __VA_ARGS__();                      \
      }                                            \
      case ::block_attn::cuda::DType::kFloat16: {  \
        using TYPE_NAME = __half;                  \
        return __VA_ARGS__();                      \
      }                                            \
      case ::block_attn::cuda::DType::kBFloat16: { \
        using TYPE_NAME = __nv_bfloat16;           \
        return __VA_ARGS__();                      \
      }                                            \
    }                                              \
    return cudaErrorInvalidValue;                  \
  }()

// Rounds head_dim up to the head dims the simple kernels are built for (one value per lane of a
// warp up to eight); the padding is zero and never written.
#define SIMPLE_HEADDIM_SWITCH(HEADDIM, CONST_NAME, ...) \
  [&] {                                                 \
    if (HEADDIM <= 32) {                                \
      constexpr static int CONST_NAME = 32;             \
      return __VA_ARGS__();                             \
    } else if (HEADDIM <= 64) {                         \
      constexpr static int CONST_NAME = 64;             \
      return __VA_ARGS__();                             \
    } else if (HEADDIM <= 128) {                        \
      constexpr static int CONST_NAME = 128;            \
      return __VA_ARGS__();                             \
    } else {                                            \
      constexpr static int CONST_NAME = 256;            \
      return __VA_ARGS__();                             \
    }                                                   \
  }()

// Rounds head_dim up to the head dims the tensor-core kernels are built for. 64 and 128 are the
// common sizes and get exact tiles; the rest pays for zero padding up to the next size.
#define FLASH_HEADDIM_SWITCH(HEADDIM, CONST_NAME, ...) \
  [&] {                                                \
    if (HEADDIM <= 64) {                               \
      constexpr static int CONST_NAME = 64;            \
      return __VA_ARGS__();                            \
    } else if (HEADDIM <= 128) {                       \
      constexpr static int CONST_NAME = 128;           \
      return __VA_ARGS__();                            \
    } else {                                           \
      constexpr static int CONST_NAME = 256;           \
      return __VA_ARGS__();                            \
    }                                                  \
  }()
