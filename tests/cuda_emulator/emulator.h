// Runs the CUDA kernels on the host, so that their indexing, fragment layouts, masking and
// synchronisation are tested on machines without a GPU. Force-included (g++ -include) ahead of
// every translation unit built with BLOCK_ATTN_CUDA_EMULATION; the kernel sources compile
// unchanged as C++ (under g++ the CUDA headers turn __device__, __global__ and __shared__ into
// nothing).
//
// Every CUDA thread of a CTA is a fiber on one host thread, and CTAs run one after another, so
// dynamic shared memory is one host buffer. Warps run one at a time, each as far as it can go
// before a __syncthreads, in an order that changes from CTA to CTA, so a missing barrier lets a
// warp read data other warps have not yet written. A warp collective (shuffle, vote, ldmatrix,
// mma.sync) is a rendezvous of the warp's 32 fibers, a wgmma one of the warpgroup's 128, and
// __syncthreads one of the CTA's live threads. PTX semantics follow the ISA manual; cp.async copies
// land only at cp.async.wait_group, and shared memory starts every CTA filled with 0xff bytes, so a
// read before the wait or of a byte never written shows up (ldmatrix and wgmma check for it). Races
// are checked per 16-byte chunk against the barriers: an ldmatrix or wgmma read while a copy is in
// flight or before a __syncthreads follows its landing, and a copy over what another warp read
// since the last __syncthreads. wgmma reads shared memory through the async proxy: each thread that
// wrote a chunk it reads (a landed cp.async, a store_shared) must have executed fence.proxy.async
// since, and the chunk must not be written again before the warpgroup's wgmma.wait_group retires
// the read; until that wait a wgmma's accumulator registers hold a NaN pattern that shuffles and
// tracked stores reject, so a read before the wait shows up. Other plain loads and stores are not
// tracked. Misuse - a collective with divergent lanes, a deadlock, a shared-memory access out of
// range, shared memory above the opt-in - aborts with a message naming the kernel's thread.
#pragma once

#ifndef BLOCK_ATTN_CUDA_EMULATION
#error "emulator.h is for builds with BLOCK_ATTN_CUDA_EMULATION"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>

#define __launch_bounds__(...)

// The built-in variables of the CTA and thread the emulator is running.
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

namespace cuda_emulator {

// The device the runtime API reports: compute capability, the opt-in shared memory per CTA and
// the SM count (few, so that kernels sized by it split their work as on a busy GPU).
struct DeviceProperties {
  int major = 9;
  int minor = 0;
  int max_shared_bytes_optin = 227 * 1024;
  int multiprocessors = 4;
};
void set_device_properties(const DeviceProperties& properties);
const DeviceProperties& device_properties();

// Runs `body` for every thread of every CTA of the grid. `kernel` identifies the kernel for the
// shared-memory opt-in check (cudaFuncSetAttribute).
cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, int shared_bytes,
                     const std::function<void()>& body);

template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, int shared_bytes,
                   const Args&... args) {
  return run_grid(reinterpret_cast<const void*>(kernel), grid, block, shared_bytes,
                  [&] { kernel(args...); });
}

// Aborts with the running thread's coordinates and `message`.
[[noreturn]] void fail(const char* message);

// Warp collectives. What the calling lane contributes goes into `payload` (at most
// kPayloadBytes); the return value holds all 32 lanes' payloads, valid until the lane's next
// collective. `operation` names the collective: lanes of one rendezvous must agree on it.
constexpr int kPayloadBytes = 32;
using WarpPayloads = unsigned char[32][kPayloadBytes];
const WarpPayloads& warp_exchange(const void* payload, int bytes, const char* operation);
int lane_id();

// The same over a warpgroup (four consecutive warps, 128 threads), for wgmma.
using WarpgroupPayloads = unsigned char[128][kPayloadBytes];
const WarpgroupPayloads& warpgroup_exchange(const void* payload, int bytes, const char* operation);
int warpgroup_thread();  // 0..127 within the warpgroup

// Offset of a pointer into the CTA's shared memory (what a shared-window address holds), and the
// pointer at an offset, checked to lie within the launch's dynamic shared memory.
uint32_t shared_offset(const void* p);
const unsigned char* shared_at(uint32_t offset, int bytes);

void sync_threads();

// The CTA's dynamic shared memory, [begin, begin + bytes) of the launch.
bool in_shared_memory(const void* p, int bytes);

// cp.async: queued per thread, copied at wait.
void cp_async_16(void* shared, const void* global);
void cp_async_wait_all();
// Race checks against cp.async for a 16-byte shared-memory read (an ldmatrix row).
void note_shared_read(const void* p);

// The async proxy (wgmma's operand reads) sees a thread's generic-proxy writes to shared memory
// (landed cp.async copies, tracked stores) only after that thread's fence.proxy.async.
// A tracked plain store of `bytes` to shared memory, checked against copies in flight and other
// warps' reads since the last __syncthreads.
void note_shared_store(const void* p, int bytes);
void fence_proxy_async();
// Race and proxy checks for a wgmma operand read of the 16-byte chunk at a shared-window offset:
// no copy in flight, a __syncthreads since it was written, the writers' fences since.
void note_async_read(uint32_t offset);
// wgmma.commit_group and wgmma.wait_group for the calling warpgroup's noted reads: a chunk stays
// read, and must not be overwritten, until the wait that retires its group.
void commit_async_reads();
void wait_async_reads(int pending);

// The calling thread's share of wgmma products runs at the wgmma.wait_group that retires its
// commit group, as on the hardware, where results land only then. Until then the destination
// registers (`bytes` at `accumulators`) hold kPendingAccumulator in every 32-bit word, and hold
// their values again only when the product runs: a product finds them changed if they were
// written before the wait, and a read before the wait carries the pattern into the checks of
// holds_pending_accumulator.
void defer_product(void* accumulators, int bytes, std::function<void()> run);
void commit_products();
void run_products(int pending);

// A quiet NaN with a payload that float arithmetic carries along (x86 keeps the first NaN
// operand's payload), so what is computed from an accumulator read before the wait shows it too.
constexpr uint32_t kPendingAccumulator = 0x7fc0deadu;
// Whether a 32-bit word at a multiple of 4 bytes into [p, p + bytes) holds kPendingAccumulator;
// checked where register values leave a thread (shuffles, tracked shared-memory stores).
bool holds_pending_accumulator(const void* p, int bytes);

template <typename T>
T shuffle(unsigned mask, T x, int source_lane, const char* operation) {
  static_assert(sizeof(T) <= kPayloadBytes, "shuffle payload too large");
  if (mask != 0xffffffffu) fail("shuffle with a partial lane mask");
  if (holds_pending_accumulator(&x, sizeof(T))) {
    fail("shuffle of a value read from wgmma accumulators before the wait for their product");
  }
  const WarpPayloads& all = warp_exchange(&x, sizeof(T), operation);
  T y;
  std::memcpy(&y, all[source_lane & 31], sizeof(T));
  return y;
}

}  // namespace cuda_emulator

// The runtime's template overload for kernel pointers, which the CUDA headers declare only for
// nvcc.
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attribute, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attribute, value);
}

inline void __syncthreads() {
  cuda_emulator::sync_threads();
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T x, int lane_mask) {
  return cuda_emulator::shuffle(mask, x, cuda_emulator::lane_id() ^ lane_mask, "shfl.bfly");
}
template <typename T>
T __shfl_sync(unsigned mask, T x, int source_lane) {
  return cuda_emulator::shuffle(mask, x, source_lane, "shfl.idx");
}
inline int __any_sync(unsigned mask, int predicate) {
  if (mask != 0xffffffffu) cuda_emulator::fail("vote with a partial lane mask");
  const bool mine = predicate != 0;
  const cuda_emulator::WarpPayloads& all =
      cuda_emulator::warp_exchange(&mine, sizeof(mine), "vote.any");
  for (int lane = 0; lane < 32; ++lane) {
    if (all[lane][0]) return 1;
  }
  return 0;
}

// One host thread runs every emulated thread, so atomics are plain read-modify-writes.
inline float atomicAdd(float* address, float value) {
  const float old = *address;
  *address = old + value;
  return old;
}

// A shared-window address is the offset into the CTA's shared memory.
inline size_t __cvta_generic_to_shared(const void* p) {
  return cuda_emulator::shared_offset(p);
}

// CUDA's device overloads of min and max.
inline int min(int a, int b) {
  return a < b ? a : b;
}
inline int max(int a, int b) {
  return a > b ? a : b;
}
inline float max(float a, float b) {
  return fmaxf(a, b);
}
inline double max(double a, double b) {
  return fmax(a, b);
}
