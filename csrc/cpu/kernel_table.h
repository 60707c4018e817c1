// The CPU kernels of one build, as plain function pointers. A portable build compiles the kernels
// once per instruction-set capability, each into its own shared object, and picks at run time the
// best one the CPU supports (cpu_capability.h); the table is what such an object hands over.
#pragma once

#include "../attention_params.h"

namespace block_attn::cpu {

// Index of a dtype in the table's arrays.
enum KernelDtype : int { kFloatKernel = 0, kDoubleKernel, kBFloat16Kernel, kHalfKernel, kDtypes };

// Bumped whenever KernelTable or the params structs change, so that a stale kernel object left
// beside a newer extension is refused instead of called with the wrong layout.
constexpr int kKernelTableVersion = 1;

struct KernelTable {
  int version;
  int params_bytes;  // sizeof(BackwardParams) where the table was compiled
  const char* capability;
  void (*forward[kDtypes])(const ForwardParams&);
  void (*backward[kDtypes])(const BackwardParams&);
};

// The table of the kernels compiled into this binary (with this translation unit's flags).
const KernelTable& compiled_kernel_table();

}  // namespace block_attn::cpu

// The symbol a kernel object exports: `const KernelTable* block_attn_cpu_kernel_table()`.
#define BLOCK_ATTN_KERNEL_TABLE_SYMBOL "block_attn_cpu_kernel_table"
