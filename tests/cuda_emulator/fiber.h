// Minimal stackful fibers for the CUDA emulator: one per emulated thread, switched cooperatively
// on one host thread. On x86-64 a switch saves only the callee-saved registers (tens of
// nanoseconds, against a system call per switch for swapcontext, which is used elsewhere).
#pragma once

#include <cstddef>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace cuda_emulator {

class Fiber {
 public:
  // `entry` runs on the fiber's own stack the first time the fiber is resumed; it must never
  // return (it switches away for the last time instead).
  Fiber(std::size_t stack_bytes, void (*entry)());
  ~Fiber();
  Fiber(const Fiber&) = delete;
  Fiber& operator=(const Fiber&) = delete;

  // Starts `entry` afresh on the next resume.
  void reset();
  // From the scheduler: runs the fiber until it yields.
  void resume();
  // From the fiber: back to the scheduler.
  void yield();

 private:
  void* stack_ = nullptr;
  std::size_t stack_bytes_ = 0;
  void (*entry_)() = nullptr;
#if defined(__x86_64__)
  void* fiber_sp_ = nullptr;
  void* scheduler_sp_ = nullptr;
#else
  ucontext_t fiber_context_{};
  ucontext_t scheduler_context_{};
#endif
};

}  // namespace cuda_emulator
