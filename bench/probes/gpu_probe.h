// What the plain-CUDA GPU probes share: reporting a CUDA error, and the median time of a launch.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <vector>

namespace gpu_probe {

constexpr int kWarmupRuns = 3;
constexpr int kTimedRuns = 10;

// Prints `what` and the error unless err is cudaSuccess.
inline bool check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) std::printf("%s: %s\n", what, cudaGetErrorString(err));
  return err == cudaSuccess;
}

// Median milliseconds of `launch` over kTimedRuns runs after kWarmupRuns, by CUDA events on the
// default stream; -1 if a launch or a kernel failed.
inline double median_ms(const std::function<cudaError_t()>& launch) {
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  std::vector<float> times;
  for (int rep = 0; rep < kWarmupRuns + kTimedRuns; ++rep) {
    cudaEventRecord(start);
    const cudaError_t err = launch();
    cudaEventRecord(stop);
    if (!check(err, "launch") || !check(cudaEventSynchronize(stop), "kernel")) return -1;
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    if (rep >= kWarmupRuns) times.push_back(ms);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace gpu_probe
