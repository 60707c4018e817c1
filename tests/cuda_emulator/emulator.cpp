#include "emulator.h"

#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <vector>

#include "cuda/shared_memory.cuh"
#include "fiber.h"

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace {
constexpr int kSharedCapacity = 256 * 1024;
}

// One CTA runs at a time, so one buffer serves them all.
alignas(1024) unsigned char block_attn::cuda::smem_raw[kSharedCapacity];

namespace cuda_emulator {
namespace {

constexpr std::size_t kStackBytes = 256 * 1024;

struct PendingCopy {
  void* shared;
  const void* global;
};

// Accesses to one 16-byte chunk of shared memory, for the race checks. Epochs count the CTA's
// completed __syncthreads.
struct ChunkAccesses {
  static constexpr int kManyWarps = -2;
  unsigned read_epoch = ~0u;    // latest ldmatrix read
  int reader_warp = -1;         // its warp, or kManyWarps if several read in that epoch
  int copy_in_flight_by = -1;   // thread whose cp.async to the chunk is not yet waited for
  unsigned landed_epoch = ~0u;  // when the last cp.async landed (its thread's wait) or store
  int unfenced_writes = 0;      // generic-proxy writes whose thread has not fenced the proxies
  int wgmma_readers = 0;        // wgmma reads not yet behind their warpgroup's wait
};

// A warpgroup's wgmma operand reads, by commit group: the chunks of the groups still running
// (oldest first) and of the products issued since the last commit.
struct WarpgroupReads {
  std::vector<std::vector<ChunkAccesses*>> committed;
  std::vector<ChunkAccesses*> open;
};

struct Thread {
  std::unique_ptr<Fiber> fiber;
  uint3 index{};
  bool done = false;
  // While waiting: resumed once *wait_generation moves past wait_value.
  const unsigned* wait_generation = nullptr;
  unsigned wait_value = 0;
  unsigned collectives = 0;  // warp collectives so far: picks the payload buffer
  unsigned warpgroup_collectives = 0;
  std::vector<PendingCopy> pending_copies;
  std::vector<ChunkAccesses*> unfenced_chunks;  // its writes not yet behind fence.proxy.async
  // Its wgmma products not yet run: committed groups (oldest first) and those issued since.
  struct Product {
    void* accumulators;
    int bytes;
    std::function<void()> run;
  };
  std::vector<std::vector<Product>> committed_products;
  std::vector<Product> open_products;
  // What the destination registers of its pending products held before the first of them.
  std::map<void*, std::vector<unsigned char>> held_accumulators;
};

// The meeting point of a warp's (or warpgroup's) collectives.
template <int kMembers>
struct Rendezvous {
  // Two payload buffers, alternating: a member can only write collective n + 2's payload after
  // every member has arrived at n + 1, so done reading n's.
  unsigned char payloads[2][kMembers][kPayloadBytes];
  const char* operations[kMembers];
  int arrived = 0;
  unsigned generation = 0;
};
using Warp = Rendezvous<32>;
using Warpgroup = Rendezvous<128>;

struct State {
  DeviceProperties device;
  std::map<const void*, int> shared_bytes_optin;  // per kernel, from cudaFuncSetAttribute
  cudaError_t last_error = cudaSuccess;

  std::vector<Thread> threads;
  std::vector<Warp> warps;
  std::vector<Warpgroup> warpgroups;
  Thread* current = nullptr;
  const std::function<void()>* body = nullptr;
  int shared_bytes = 0;
  int live = 0;
  int barrier_arrived = 0;
  unsigned barrier_generation = 0;
  std::vector<ChunkAccesses> chunks;  // of the CTA's dynamic shared memory
  std::vector<WarpgroupReads> wgmma_reads;
};

State& state() {
  static State s;
  return s;
}

int linear_thread_index() {
  return static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
}

void wait_until_moved(Thread& thread, const unsigned& generation, unsigned value) {
  thread.wait_generation = &generation;
  thread.wait_value = value;
  thread.fiber->yield();
}

void finish_barrier_if_complete(State& s) {
  if (s.barrier_arrived > 0 && s.barrier_arrived == s.live) {
    s.barrier_arrived = 0;
    ++s.barrier_generation;
  }
}

void thread_entry() {
  State& s = state();
  (*s.body)();
  Thread& thread = *s.current;
  if (!thread.pending_copies.empty()) fail("thread exited with cp.async copies not waited for");
  if (!thread.committed_products.empty() || !thread.open_products.empty()) {
    fail("thread exited with wgmma products not waited for");
  }
  thread.done = true;
  --s.live;
  finish_barrier_if_complete(s);  // exited threads no longer hold up __syncthreads
  thread.fiber->yield();
  std::abort();  // never resumed
}

[[noreturn]] void fail_deadlock(const State& s) {
  int at_barrier = 0;
  int at_warp = 0;
  for (const Thread& t : s.threads) {
    if (t.done) continue;
    (t.wait_generation == &s.barrier_generation ? at_barrier : at_warp) += 1;
  }
  std::fprintf(stderr,
               "cuda emulator: deadlock in block (%u, %u, %u): %d threads wait at __syncthreads, "
               "%d in warp or warpgroup collectives that others never reach\n",
               blockIdx.x, blockIdx.y, blockIdx.z, at_barrier, at_warp);
  std::abort();
}

int current_thread(const State& s) {
  return static_cast<int>(s.current - s.threads.data());
}

ChunkAccesses& chunk_of(State& s, const void* p) {
  return s.chunks[(static_cast<const unsigned char*>(p) - block_attn::cuda::smem_raw) / 16];
}

// Resumes every runnable thread of warp `w` until none is: the warp runs until it waits at
// __syncthreads or is done. Returns whether any thread ran.
bool run_warp(State& s, int w) {
  bool ran_any = false;
  for (bool ran = true; ran;) {
    ran = false;
    for (int i = 32 * w; i < 32 * (w + 1); ++i) {
      Thread& t = s.threads[i];
      if (t.done) continue;
      if (t.wait_generation != nullptr && *t.wait_generation == t.wait_value) continue;
      t.wait_generation = nullptr;
      s.current = &t;
      threadIdx = t.index;
      t.fiber->resume();
      ran = ran_any = true;
    }
  }
  return ran_any;
}

// CTA number `cta` (in launch order) runs its warps one at a time, each as far as it can go,
// starting from a different warp and alternating direction from CTA to CTA: a schedule real
// hardware may pick, and one that makes a warp read what other warps have not yet written (or
// still hold from the last tile) wherever a __syncthreads is missing. Odd CTAs always resume the
// first runnable warp in that order, so a warpgroup (whose warps meet at every wgmma) runs ahead
// of the others up to the next __syncthreads; even CTAs take the warps in turn.
void run_cta(State& s, unsigned cta) {
  std::memset(block_attn::cuda::smem_raw, 0xff, s.shared_bytes);
  s.chunks.assign((s.shared_bytes + 15) / 16, ChunkAccesses{});
  s.wgmma_reads.assign(s.threads.size() / 128, WarpgroupReads{});
  for (Thread& t : s.threads) {
    t.fiber->reset();
    t.done = false;
    t.wait_generation = nullptr;
    t.collectives = 0;
    t.warpgroup_collectives = 0;
    t.pending_copies.clear();
    t.unfenced_chunks.clear();
    t.committed_products.clear();
    t.open_products.clear();
    t.held_accumulators.clear();
  }
  for (Warp& w : s.warps) w.arrived = 0;
  for (Warpgroup& w : s.warpgroups) w.arrived = 0;
  s.live = static_cast<int>(s.threads.size());
  s.barrier_arrived = 0;
  const int warps = static_cast<int>(s.warps.size());
  const bool greedy = cta % 2 == 1;
  const int first = static_cast<int>((cta / 2) % warps);
  const bool descending = (cta / 2 / warps) % 2 == 1;
  while (s.live > 0) {
    bool ran = false;
    for (int k = 0; k < warps; ++k) {
      const int w = descending ? (first - k + warps) % warps : (first + k) % warps;
      if (run_warp(s, w)) {
        ran = true;
        if (greedy) break;
      }
    }
    if (!ran) fail_deadlock(s);
  }
  s.current = nullptr;
}

cudaError_t check_launch(const State& s, const void* kernel, dim3 grid, dim3 block,
                         int shared_bytes) {
  const long threads = static_cast<long>(block.x) * block.y * block.z;
  if (threads < 1 || threads > 1024 || grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 ||
      grid.z > 65535 || grid.x > 2147483647u) {
    return cudaErrorInvalidConfiguration;
  }
  if (threads % 32 != 0) {
    std::fprintf(stderr, "cuda emulator: blocks of %ld threads; only whole warps are emulated\n",
                 threads);
    std::abort();
  }
  if (shared_bytes > 48 * 1024) {
    const auto optin = s.shared_bytes_optin.find(kernel);
    if (optin == s.shared_bytes_optin.end() || optin->second < shared_bytes) {
      return cudaErrorInvalidValue;
    }
  }
  if (shared_bytes < 0 || shared_bytes > kSharedCapacity) return cudaErrorInvalidValue;
  return cudaSuccess;
}

}  // namespace

void set_device_properties(const DeviceProperties& properties) {
  state().device = properties;
}

const DeviceProperties& device_properties() {
  return state().device;
}

cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, int shared_bytes,
                     const std::function<void()>& body) {
  State& s = state();
  const cudaError_t err = check_launch(s, kernel, grid, block, shared_bytes);
  if (err != cudaSuccess) {
    s.last_error = err;
    return err;
  }
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (static_cast<int>(s.threads.size()) != threads) {
    s.threads = std::vector<Thread>(threads);
    for (Thread& t : s.threads) t.fiber = std::make_unique<Fiber>(kStackBytes, thread_entry);
    s.warps = std::vector<Warp>(threads / 32);
    s.warpgroups = std::vector<Warpgroup>(threads / 128);
  }
  for (int i = 0; i < threads; ++i) {
    const int x = i % block.x;
    const int y = (i / block.x) % block.y;
    const int z = i / (block.x * block.y);
    s.threads[i].index = make_uint3(x, y, z);
  }
  s.body = &body;
  s.shared_bytes = shared_bytes;
  blockDim = block;
  gridDim = grid;
  unsigned cta = 0;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = make_uint3(x, y, z);
        run_cta(s, cta++);
      }
    }
  }
  s.body = nullptr;
  return cudaSuccess;
}

void fail(const char* message) {
  std::fprintf(stderr, "cuda emulator: %s (thread (%u, %u, %u) of block (%u, %u, %u))\n", message,
               threadIdx.x, threadIdx.y, threadIdx.z, blockIdx.x, blockIdx.y, blockIdx.z);
  std::abort();
}

int lane_id() {
  return linear_thread_index() % 32;
}

namespace {

// Publishes the calling member's payload, waits for the other members, and returns all payloads.
template <int kMembers>
const unsigned char (*exchange(Rendezvous<kMembers>& r, int member, unsigned& counter,
                               const void* payload, int bytes, const char* operation))
    [kPayloadBytes] {
      State& s = state();
      const int buffer = counter++ % 2;
      std::memcpy(r.payloads[buffer][member], payload, bytes);
      r.operations[member] = operation;
      const unsigned generation = r.generation;
      if (++r.arrived == kMembers) {
        for (int other = 0; other < kMembers; ++other) {
          if (std::strcmp(r.operations[other], operation) != 0) {
            std::fprintf(stderr, "cuda emulator: member %d at %s while member %d at %s\n", other,
                         r.operations[other], member, operation);
            fail("threads diverged at a warp or warpgroup collective");
          }
        }
        r.arrived = 0;
        ++r.generation;
      } else {
        wait_until_moved(*s.current, r.generation, generation);
      }
      return r.payloads[buffer];
    }

}  // namespace

const WarpPayloads& warp_exchange(const void* payload, int bytes, const char* operation) {
  State& s = state();
  const int thread = linear_thread_index();
  return *reinterpret_cast<const WarpPayloads*>(exchange(
      s.warps[thread / 32], thread % 32, s.current->collectives, payload, bytes, operation));
}

const WarpgroupPayloads& warpgroup_exchange(const void* payload, int bytes, const char* operation) {
  State& s = state();
  const int thread = linear_thread_index();
  if (s.warpgroups.empty()) fail("warpgroup collective in a block of fewer than 128 threads");
  return *reinterpret_cast<const WarpgroupPayloads*>(
      exchange(s.warpgroups[thread / 128], thread % 128, s.current->warpgroup_collectives, payload,
               bytes, operation));
}

int warpgroup_thread() {
  return linear_thread_index() % 128;
}

uint32_t shared_offset(const void* p) {
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - block_attn::cuda::smem_raw);
}

const unsigned char* shared_at(uint32_t offset, int bytes) {
  const unsigned char* p = block_attn::cuda::smem_raw + offset;
  if (!in_shared_memory(p, bytes)) fail("wgmma operand outside the CTA's dynamic shared memory");
  return p;
}

void sync_threads() {
  State& s = state();
  const unsigned generation = s.barrier_generation;
  ++s.barrier_arrived;
  finish_barrier_if_complete(s);
  if (s.barrier_generation == generation) {
    wait_until_moved(*s.current, s.barrier_generation, generation);
  }
}

bool in_shared_memory(const void* p, int bytes) {
  const auto* begin = block_attn::cuda::smem_raw;
  const auto* byte = static_cast<const unsigned char*>(p);
  return byte >= begin && byte + bytes <= begin + state().shared_bytes;
}

void cp_async_16(void* shared, const void* global) {
  if (reinterpret_cast<uintptr_t>(shared) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(global) % 16 != 0) {
    fail("cp.async of 16 bytes from or to an address not 16-byte aligned");
  }
  if (!in_shared_memory(shared, 16)) fail("cp.async outside the CTA's dynamic shared memory");
  State& s = state();
  ChunkAccesses& chunk = chunk_of(s, shared);
  if (chunk.copy_in_flight_by >= 0) fail("two cp.async to the same shared memory in flight");
  if (chunk.wgmma_readers > 0) {
    fail("cp.async overwrites shared memory that a wgmma not yet waited for reads");
  }
  const int warp = current_thread(s) / 32;
  if (chunk.read_epoch == s.barrier_generation && chunk.reader_warp != warp) {
    fail("cp.async overwrites shared memory that another warp read since the last __syncthreads");
  }
  chunk.copy_in_flight_by = current_thread(s);
  s.current->pending_copies.push_back({shared, global});
}

void cp_async_wait_all() {
  State& s = state();
  Thread& thread = *s.current;
  for (const PendingCopy& copy : thread.pending_copies) {
    std::memcpy(copy.shared, copy.global, 16);
    ChunkAccesses& chunk = chunk_of(s, copy.shared);
    chunk.copy_in_flight_by = -1;
    chunk.landed_epoch = s.barrier_generation;
    ++chunk.unfenced_writes;
    thread.unfenced_chunks.push_back(&chunk);
  }
  thread.pending_copies.clear();
}

void note_shared_read(const void* p) {
  State& s = state();
  ChunkAccesses& chunk = chunk_of(s, p);
  if (chunk.copy_in_flight_by >= 0) {
    fail("ldmatrix reads shared memory while a cp.async to it is in flight");
  }
  if (chunk.landed_epoch == s.barrier_generation) {
    fail("ldmatrix reads shared memory whose cp.async landed with no __syncthreads since");
  }
  const int warp = current_thread(s) / 32;
  if (chunk.read_epoch != s.barrier_generation) {
    chunk.read_epoch = s.barrier_generation;
    chunk.reader_warp = warp;
  } else if (chunk.reader_warp != warp) {
    chunk.reader_warp = ChunkAccesses::kManyWarps;
  }
}

void note_shared_store(const void* p, int bytes) {
  if (!in_shared_memory(p, bytes)) fail("store outside the CTA's dynamic shared memory");
  State& s = state();
  const int warp = current_thread(s) / 32;
  const auto* begin = static_cast<const unsigned char*>(p);
  const std::size_t first = (begin - block_attn::cuda::smem_raw) / 16;
  const std::size_t last = (begin + bytes - 1 - block_attn::cuda::smem_raw) / 16;
  for (std::size_t index = first; index <= last; ++index) {
    ChunkAccesses& chunk = s.chunks[index];
    if (chunk.copy_in_flight_by >= 0)
      fail("store to shared memory with a cp.async to it in flight");
    if (chunk.wgmma_readers > 0) {
      fail("store overwrites shared memory that a wgmma not yet waited for reads");
    }
    if (chunk.read_epoch == s.barrier_generation && chunk.reader_warp != warp) {
      fail("store overwrites shared memory that another warp read since the last __syncthreads");
    }
    chunk.landed_epoch = s.barrier_generation;
    ++chunk.unfenced_writes;
    s.current->unfenced_chunks.push_back(&chunk);
  }
}

void fence_proxy_async() {
  Thread& thread = *state().current;
  for (ChunkAccesses* chunk : thread.unfenced_chunks) --chunk->unfenced_writes;
  thread.unfenced_chunks.clear();
}

void note_async_read(uint32_t offset) {
  State& s = state();
  if (offset % 16 != 0) fail("wgmma operand chunk not 16-byte aligned");
  ChunkAccesses& chunk = s.chunks[(shared_at(offset, 16) - block_attn::cuda::smem_raw) / 16];
  if (chunk.copy_in_flight_by >= 0) {
    fail("wgmma reads shared memory while a cp.async to it is in flight");
  }
  if (chunk.landed_epoch == s.barrier_generation) {
    fail(
        "wgmma reads shared memory written (cp.async landed or stored) with no __syncthreads "
        "since");
  }
  if (chunk.unfenced_writes > 0) {
    fail(
        "wgmma reads shared memory written through the generic proxy (cp.async or a store) with no "
        "fence.proxy.async by the writing thread since");
  }
  // Asynchronous reads: until the warpgroup's wait, and then until the next __syncthreads, no
  // warp may overwrite the chunk.
  chunk.read_epoch = s.barrier_generation;
  chunk.reader_warp = ChunkAccesses::kManyWarps;
  ++chunk.wgmma_readers;
  s.wgmma_reads[linear_thread_index() / 128].open.push_back(&chunk);
}

void commit_async_reads() {
  WarpgroupReads& reads = state().wgmma_reads[linear_thread_index() / 128];
  reads.committed.push_back(std::move(reads.open));
  reads.open.clear();
}

void wait_async_reads(int pending) {
  WarpgroupReads& reads = state().wgmma_reads[linear_thread_index() / 128];
  while (static_cast<int>(reads.committed.size()) > pending) {
    for (ChunkAccesses* chunk : reads.committed.front()) --chunk->wgmma_readers;
    reads.committed.erase(reads.committed.begin());
  }
}

namespace {

void fill_pending(void* accumulators, int bytes) {
  auto* words = static_cast<unsigned char*>(accumulators);
  for (int offset = 0; offset + 4 <= bytes; offset += 4) {
    std::memcpy(words + offset, &kPendingAccumulator, 4);
  }
}

bool all_pending(const void* accumulators, int bytes) {
  const auto* words = static_cast<const unsigned char*>(accumulators);
  for (int offset = 0; offset + 4 <= bytes; offset += 4) {
    if (std::memcmp(words + offset, &kPendingAccumulator, 4) != 0) return false;
  }
  return true;
}

bool product_pending(const Thread& thread, const void* accumulators) {
  for (const auto& group : thread.committed_products) {
    for (const Thread::Product& product : group) {
      if (product.accumulators == accumulators) return true;
    }
  }
  for (const Thread::Product& product : thread.open_products) {
    if (product.accumulators == accumulators) return true;
  }
  return false;
}

// Keeps what the registers hold for the next product into them and marks them pending.
void hold_accumulators(Thread& thread, void* accumulators, int bytes) {
  const auto* begin = static_cast<const unsigned char*>(accumulators);
  thread.held_accumulators[accumulators].assign(begin, begin + bytes);
  fill_pending(accumulators, bytes);
}

}  // namespace

void defer_product(void* accumulators, int bytes, std::function<void()> run) {
  Thread& thread = *state().current;
  if (!product_pending(thread, accumulators)) {
    hold_accumulators(thread, accumulators, bytes);
  } else if (!all_pending(accumulators, bytes)) {
    fail("wgmma accumulator registers written before the wait for the product");
  }
  thread.open_products.push_back({accumulators, bytes, std::move(run)});
}

void commit_products() {
  Thread& thread = *state().current;
  thread.committed_products.push_back(std::move(thread.open_products));
  thread.open_products.clear();
}

void run_products(int pending) {
  Thread& thread = *state().current;
  while (static_cast<int>(thread.committed_products.size()) > pending) {
    std::vector<Thread::Product> group = std::move(thread.committed_products.front());
    thread.committed_products.erase(thread.committed_products.begin());
    for (std::size_t i = 0; i < group.size(); ++i) {
      Thread::Product& product = group[i];
      if (!all_pending(product.accumulators, product.bytes)) {
        fail("wgmma accumulator registers written before the wait for the product");
      }
      const auto held = thread.held_accumulators.find(product.accumulators);
      std::memcpy(product.accumulators, held->second.data(), product.bytes);
      thread.held_accumulators.erase(held);
      product.run();
      // A later product into the same registers (in this group or one still running) starts
      // from this one's result.
      bool more = product_pending(thread, product.accumulators);
      for (std::size_t later = i + 1; later < group.size() && !more; ++later) {
        more = group[later].accumulators == product.accumulators;
      }
      if (more) hold_accumulators(thread, product.accumulators, product.bytes);
    }
  }
}

bool holds_pending_accumulator(const void* p, int bytes) {
  const auto* words = static_cast<const unsigned char*>(p);
  for (int offset = 0; offset + 4 <= bytes; offset += 4) {
    if (std::memcmp(words + offset, &kPendingAccumulator, 4) == 0) return true;
  }
  return false;
}

}  // namespace cuda_emulator

// The runtime API the launch code calls, answered for the emulated device.
extern "C" {

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  const cuda_emulator::DeviceProperties& p = cuda_emulator::device_properties();
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attribute) {
    case cudaDevAttrComputeCapabilityMajor:
      *value = p.major;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor:
      *value = p.minor;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = p.max_shared_bytes_optin;
      return cudaSuccess;
    case cudaDevAttrMultiProcessorCount:
      *value = p.multiprocessors;
      return cudaSuccess;
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attribute, int value) {
  cuda_emulator::State& s = cuda_emulator::state();
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value > s.device.max_shared_bytes_optin) {
    s.last_error = cudaErrorInvalidValue;
    return cudaErrorInvalidValue;
  }
  s.shared_bytes_optin[func] = value;
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* device_pointer, int value, size_t bytes, cudaStream_t) {
  std::memset(device_pointer, value, bytes);
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  cuda_emulator::State& s = cuda_emulator::state();
  const cudaError_t err = s.last_error;
  s.last_error = cudaSuccess;
  return err;
}

}  // extern "C"
