// Tests of the host CUDA emulator itself: small kernels that each carry one synchronisation bug
// the emulator is there to catch must fail with a message naming the CTA and the thread, and the
// same kernels without the bug must run and compute the right values. A caught bug aborts, so
// every run happens in a child process whose exit status and error output are checked.
#include <cuda_bf16.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <regex>
#include <string>
#include <vector>

#include "cuda/flash/mma_utils.cuh"
#include "cuda/hopper/swizzled_tiles.cuh"
#include "cuda/hopper/wgmma.cuh"
#include "cuda/shared_memory.cuh"
#include "cuda/utils.cuh"

namespace block_attn::cuda::emulator_test {

// Staging: a 16 x 16 bf16 tile, two 16-byte chunks per row, one chunk per lane of warp 0.
constexpr int kTileColumns = 16;
enum class StagingBug { kNone, kNoBarrier, kNoCopyWait };

// Warp 0 copies the tile into shared memory with cp.async; warp 1 reads it with ldmatrix.
template <StagingBug kBug>
__global__ void stage_then_ldmatrix_kernel(const __nv_bfloat16* tile, uint32_t* fragments) {
  auto* staged = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (warp == 0) {
    const int offset = (lane / 2) * kTileColumns + 8 * (lane % 2);
    cp_async_16(staged + offset, tile + offset);
    cp_async_commit();
    if constexpr (kBug != StagingBug::kNoCopyWait) cp_async_wait_all();
  }
  if constexpr (kBug != StagingBug::kNoBarrier) __syncthreads();
  if (warp == 1) {
    // Matrix i: rows 8 (i % 2) .. + 7, columns 8 (i / 2) .. + 7; lanes 8 i .. 8 i + 7 its rows.
    const int row = lane % 8 + 8 * ((lane / 8) % 2);
    uint32_t r[4];
    ldmatrix_x4(r, staged + row * kTileColumns + 8 * (lane / 16));
    for (int i = 0; i < 4; ++i) fragments[4 * lane + i] = r[i];
  }
}

// Products: C (64 x 64) = A B^T for A and B 64 x 64, both staged K-major in the 128-byte swizzle.
constexpr int kExtent = 64;
constexpr int kTileBytes = kExtent * kExtent * 2;
enum class ProductBug { kNone, kNoProxyFence, kReadBeforeWait, kWriteBeforeWait };

// One warpgroup stages A and B with cp.async and forms C in four chained wgmmas; every thread
// writes its accumulators to c and the warp sum of its first accumulator to warp_sums.
template <ProductBug kBug>
__global__ void stage_then_wgmma_kernel(const __nv_bfloat16* a, const __nv_bfloat16* b, float* c,
                                        float* warp_sums) {
  unsigned char* a_tile = smem_raw;
  unsigned char* b_tile = smem_raw + kTileBytes;
  hopper::load_tile_swizzled<kExtent, kExtent, 128>(a_tile, a, kExtent, 0, kExtent);
  hopper::load_tile_swizzled<kExtent, kExtent, 128>(b_tile, b, kExtent, 0, kExtent);
  cp_async_wait_all();
  if constexpr (kBug != ProductBug::kNoProxyFence) hopper::fence_shared_for_async_reads();
  __syncthreads();
  float d[32];
  hopper::wgmma_fence();
  for (int k0 = 0; k0 < kExtent; k0 += 16) {
    hopper::wgmma_m64n64k16<__nv_bfloat16, false>(d, hopper::k_major_descriptor(a_tile, k0),
                                                  hopper::k_major_descriptor(b_tile, k0), k0 > 0);
  }
  hopper::wgmma_commit();
  float first_sum = 0.f;
  if constexpr (kBug == ProductBug::kReadBeforeWait) first_sum = warp_sum(d[0]);
  if constexpr (kBug == ProductBug::kWriteBeforeWait) d[0] = 0.f;
  hopper::wgmma_wait<0>();
  hopper::fence_operands(d);
  if constexpr (kBug != ProductBug::kReadBeforeWait) first_sum = warp_sum(d[0]);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  for (int i = 0; i < 32; ++i) {
    const int row = 16 * warp + lane / 4 + 8 * ((i % 4) / 2);
    const int column = 8 * (i / 4) + 2 * (lane % 4) + i % 2;
    c[row * kExtent + column] = d[i];
  }
  warp_sums[threadIdx.x] = first_sum;
}

uint16_t bits_of(__nv_bfloat16 x) {
  uint16_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

// Small integers, exact in bf16 and in the float sums of their products.
float staging_value(int row, int column) {
  return static_cast<float>(row * kTileColumns + column);
}
float a_value(int row, int k) {
  return static_cast<float>((row + 2 * k) % 5 - 2);
}
float b_value(int column, int k) {
  return static_cast<float>((3 * column + k) % 7 - 3);
}

// Runs the staging kernel; returns 0 if every fragment holds what ldmatrix defines.
template <StagingBug kBug>
int run_staging() {
  std::vector<__nv_bfloat16> tile(16 * kTileColumns);
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < kTileColumns; ++c) {
      tile[r * kTileColumns + c] = __float2bfloat16(staging_value(r, c));
    }
  }
  std::vector<uint32_t> fragments(32 * 4);
  const cudaError_t err =
      cuda_emulator::launch(stage_then_ldmatrix_kernel<kBug>, dim3(1), dim3(64),
                            16 * kTileColumns * 2, tile.data(), fragments.data());
  if (err != cudaSuccess) {
    std::fprintf(stderr, "launch failed: error %d\n", static_cast<int>(err));
    return 1;
  }
  int wrong = 0;
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 4; ++i) {
      // Register i of lane l: row l / 4 and columns 2 (l % 4) + {0, 1} of matrix i.
      const int row = 8 * (i % 2) + lane / 4;
      const int column = 8 * (i / 2) + 2 * (lane % 4);
      const uint32_t expected =
          bits_of(__float2bfloat16(staging_value(row, column))) |
          static_cast<uint32_t>(bits_of(__float2bfloat16(staging_value(row, column + 1)))) << 16;
      if (fragments[4 * lane + i] != expected && wrong++ == 0) {
        std::fprintf(stderr, "lane %d register %d: 0x%08x, expected 0x%08x\n", lane, i,
                     fragments[4 * lane + i], expected);
      }
    }
  }
  return wrong == 0 ? 0 : 1;
}

// Runs the product kernel; returns 0 if C and the warp sums are right.
template <ProductBug kBug>
int run_product() {
  std::vector<__nv_bfloat16> a(kExtent * kExtent), b(kExtent * kExtent);
  for (int r = 0; r < kExtent; ++r) {
    for (int k = 0; k < kExtent; ++k) {
      a[r * kExtent + k] = __float2bfloat16(a_value(r, k));
      b[r * kExtent + k] = __float2bfloat16(b_value(r, k));
    }
  }
  std::vector<float> c(kExtent * kExtent), warp_sums(128);
  const cudaError_t err =
      cuda_emulator::launch(stage_then_wgmma_kernel<kBug>, dim3(1), dim3(128), 2 * kTileBytes,
                            a.data(), b.data(), c.data(), warp_sums.data());
  if (err != cudaSuccess) {
    std::fprintf(stderr, "launch failed: error %d\n", static_cast<int>(err));
    return 1;
  }
  auto expected_c = [](int row, int column) {
    float sum = 0.f;
    for (int k = 0; k < kExtent; ++k) sum += a_value(row, k) * b_value(column, k);
    return sum;
  };
  int wrong = 0;
  for (int row = 0; row < kExtent; ++row) {
    for (int column = 0; column < kExtent; ++column) {
      const float expected = expected_c(row, column);
      if (c[row * kExtent + column] != expected && wrong++ == 0) {
        std::fprintf(stderr, "C[%d][%d] = %g, expected %g\n", row, column,
                     c[row * kExtent + column], expected);
      }
    }
  }
  for (int thread = 0; thread < 128; ++thread) {
    // Lane l's first accumulator: row 16 w + l / 4, column 2 (l % 4).
    const int warp = thread / 32;
    float expected = 0.f;
    for (int lane = 0; lane < 32; ++lane)
      expected += expected_c(16 * warp + lane / 4, 2 * (lane % 4));
    if (warp_sums[thread] != expected && wrong++ == 0) {
      std::fprintf(stderr, "warp sum of thread %d = %g, expected %g\n", thread, warp_sums[thread],
                   expected);
    }
  }
  return wrong == 0 ? 0 : 1;
}

struct ChildRun {
  int status = 0;
  std::string errors;
};

// Runs `body` in a child process (no core dump on abort); returns how it ended and its stderr.
ChildRun run_in_child(const std::function<int()>& body) {
  std::fflush(nullptr);
  int pipe_fds[2];
  if (pipe(pipe_fds) != 0) {
    std::perror("pipe");
    std::exit(2);
  }
  const pid_t pid = fork();
  if (pid < 0) {
    std::perror("fork");
    std::exit(2);
  }
  if (pid == 0) {
    close(pipe_fds[0]);
    dup2(pipe_fds[1], STDERR_FILENO);
    const rlimit no_core{0, 0};
    setrlimit(RLIMIT_CORE, &no_core);
    std::_Exit(body());
  }
  close(pipe_fds[1]);
  ChildRun run;
  char buffer[4096];
  for (ssize_t n; (n = read(pipe_fds[0], buffer, sizeof(buffer))) > 0;)
    run.errors.append(buffer, n);
  close(pipe_fds[0]);
  waitpid(pid, &run.status, 0);
  return run;
}

// The bug-free kernel must exit cleanly with the right values.
int expect_pass(const char* name, const std::function<int()>& body) {
  const ChildRun run = run_in_child(body);
  if (WIFEXITED(run.status) && WEXITSTATUS(run.status) == 0 && run.errors.empty()) {
    std::printf("ok    %s\n", name);
    return 0;
  }
  std::printf("FAIL  %s: did not run cleanly\n%s", name, run.errors.c_str());
  return 1;
}

// The kernel must abort with a message that contains `fragment` and names a thread in
// [first_thread, end_thread) of block (0, 0, 0).
int expect_caught(const char* name, const std::function<int()>& body, const char* fragment,
                  unsigned first_thread, unsigned end_thread) {
  const ChildRun run = run_in_child(body);
  if (!WIFSIGNALED(run.status) || WTERMSIG(run.status) != SIGABRT) {
    std::printf("FAIL  %s: not caught\n%s", name, run.errors.c_str());
    return 1;
  }
  static const std::regex thread_and_block(
      R"(cuda emulator: (.*) \(thread \((\d+), (\d+), (\d+)\) of block \((\d+), (\d+), (\d+)\)\))");
  std::smatch match;
  if (!std::regex_search(run.errors, match, thread_and_block)) {
    std::printf("FAIL  %s: the message names no thread\n%s", name, run.errors.c_str());
    return 1;
  }
  const unsigned thread = std::stoul(match[2]);
  const bool in_block_zero =
      match[3] == "0" && match[4] == "0" && match[5] == "0" && match[6] == "0" && match[7] == "0";
  if (match[1].str().find(fragment) == std::string::npos || !in_block_zero ||
      thread < first_thread || thread >= end_thread) {
    std::printf("FAIL  %s: expected \"%s\" from a thread in [%u, %u) of block (0, 0, 0)\n%s", name,
                fragment, first_thread, end_thread, run.errors.c_str());
    return 1;
  }
  std::printf("ok    %s: %s", name, run.errors.c_str());
  return 0;
}

}  // namespace block_attn::cuda::emulator_test

int main() {
  using namespace block_attn::cuda::emulator_test;
  int failures = 0;
  failures += expect_pass("cp.async, wait, __syncthreads, ldmatrix by another warp",
                          run_staging<StagingBug::kNone>);
  failures += expect_caught("no __syncthreads between one warp's copy and another's ldmatrix",
                            run_staging<StagingBug::kNoBarrier>, "__syncthreads", 32, 64);
  failures += expect_caught("no cp.async wait before the __syncthreads",
                            run_staging<StagingBug::kNoCopyWait>, "cp.async", 0, 64);
  failures += expect_pass("cp.async, fence.proxy.async, __syncthreads, wgmma, wait, read",
                          run_product<ProductBug::kNone>);
  failures += expect_caught("no fence.proxy.async between the copies and the wgmma",
                            run_product<ProductBug::kNoProxyFence>, "fence.proxy.async", 0, 128);
  failures += expect_caught("accumulators read before wgmma.wait_group",
                            run_product<ProductBug::kReadBeforeWait>, "before the wait", 0, 128);
  failures +=
      expect_caught("accumulators written before wgmma.wait_group",
                    run_product<ProductBug::kWriteBeforeWait>, "written before the wait", 0, 128);
  std::printf("%s: %d failure(s)\n", failures == 0 ? "PASS" : "FAIL", failures);
  return failures == 0 ? 0 : 1;
}
