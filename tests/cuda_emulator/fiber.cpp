#include "fiber.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#if defined(__x86_64__)
// switch_stack(save, load): pushes the callee-saved registers and the SSE/x87 control words,
// stores the stack pointer in *save, loads `load` and pops the same frame from there.
extern "C" void cuda_emulator_switch_stack(void** save, void* load);
asm(R"(
  .text
  .globl cuda_emulator_switch_stack
  .type cuda_emulator_switch_stack, @function
cuda_emulator_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emulator_switch_stack, .-cuda_emulator_switch_stack
)");
#endif

namespace cuda_emulator {

Fiber::Fiber(std::size_t stack_bytes, void (*entry)()) : entry_(entry) {
  const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  stack_bytes_ = (stack_bytes + page - 1) / page * page + page;  // + a guard page at the bottom
  stack_ = mmap(nullptr, stack_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (stack_ == MAP_FAILED || mprotect(stack_, page, PROT_NONE) != 0) {
    std::fprintf(stderr, "cuda emulator: cannot allocate a fiber stack\n");
    std::abort();
  }
  reset();
}

Fiber::~Fiber() {
  munmap(stack_, stack_bytes_);
}

#if defined(__x86_64__)

void Fiber::reset() {
  // The frame switch_stack pops: control words, r15, r14, r13, r12, rbx, rbp, then the return
  // address (entry) and above it a null return address for entry, so that entry starts with the
  // stack aligned as after a call.
  auto top = (reinterpret_cast<uintptr_t>(stack_) + stack_bytes_) & ~uintptr_t{15};
  auto* frame = reinterpret_cast<uint64_t*>(top - 72);
  uint32_t mxcsr = 0;
  uint16_t x87_control = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(x87_control));
  frame[0] = mxcsr | static_cast<uint64_t>(x87_control) << 32;
  for (int i = 1; i <= 6; ++i) frame[i] = 0;
  frame[7] = reinterpret_cast<uint64_t>(entry_);
  frame[8] = 0;
  fiber_sp_ = frame;
}

void Fiber::resume() {
  cuda_emulator_switch_stack(&scheduler_sp_, fiber_sp_);
}

void Fiber::yield() {
  cuda_emulator_switch_stack(&fiber_sp_, scheduler_sp_);
}

#else

void Fiber::reset() {
  getcontext(&fiber_context_);
  fiber_context_.uc_stack.ss_sp = stack_;
  fiber_context_.uc_stack.ss_size = stack_bytes_;
  fiber_context_.uc_link = nullptr;
  makecontext(&fiber_context_, entry_, 0);
}

void Fiber::resume() {
  swapcontext(&scheduler_context_, &fiber_context_);
}

void Fiber::yield() {
  swapcontext(&fiber_context_, &scheduler_context_);
}

#endif

}  // namespace cuda_emulator
