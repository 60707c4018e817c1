// Run-time choice of the CPU kernels: the best capability that is compiled and that the running
// CPU supports, or the one BLOCK_ATTN_CPU_CAPABILITY names.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "kernel_table.h"

namespace block_attn::cpu {

// Capabilities from the most to the least capable.
const std::vector<std::string>& known_capabilities();

// Whether the running CPU (and the OS, which must save the wider vector registers) supports it.
bool cpu_supports(const std::string& capability);

// Chooses the kernels among this binary's own and the kernel objects at `object_paths`
// (capability -> shared object), loads the chosen object, and returns the chosen capability.
// Raises ValueError for an unknown, uncompiled or unsupported BLOCK_ATTN_CPU_CAPABILITY.
std::string select_kernels(const std::map<std::string, std::string>& object_paths);

// The chosen kernels (this binary's own until select_kernels chooses others).
const KernelTable& selected_kernels();

// The capabilities select_kernels could choose from, most capable first.
std::vector<std::string> compiled_capabilities();

}  // namespace block_attn::cpu
