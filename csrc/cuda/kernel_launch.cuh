// The one place that launches kernels (with BLOCK_ATTN_CUDA_EMULATION the host emulator used by
// the C++ tests runs the kernel instead of the GPU) and reads the device's attributes.
#pragma once

#include <cuda_runtime.h>

namespace block_attn::cuda {

// One attribute of the current device (0 on error). An attribute query, not a stream operation:
// safe during graph capture.
inline cudaError_t current_device_attribute(cudaDeviceAttr attribute, int& value) {
  value = 0;
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(&value, attribute, device);
}

// Launches kernel(args...) on `stream` and returns the launch error.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, int shared_bytes,
                          cudaStream_t stream, const Args&... args) {
#ifdef BLOCK_ATTN_CUDA_EMULATION
  (void)stream;
  return cuda_emulator::launch(kernel, grid, block, shared_bytes, args...);
#else
  // clang-format splits the launch brackets in this template.
  // clang-format off
  kernel<<<grid, block, shared_bytes, stream>>>(args...);
  // clang-format on
  return cudaGetLastError();
#endif
}

}  // namespace block_attn::cuda
