#include "cpu_capability.h"

#include <c10/util/Exception.h>
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>

namespace block_attn::cpu {
namespace {

std::mutex selection_mutex;
std::atomic<const KernelTable*> selected{nullptr};
std::vector<std::string> compiled;  // filled by select_kernels

std::string joined(const std::vector<std::string>& names) {
  std::string text;
  for (const std::string& name : names) text += (text.empty() ? "" : ", ") + name;
  return text;
}

// Loads a kernel object privately (RTLD_LOCAL): the inline functions it compiled for its
// instruction set must never stand in for another binary's.
const KernelTable* load_table(const std::string& capability, const std::string& path) {
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  TORCH_CHECK(handle != nullptr, "block_attn: cannot load the ", capability, " CPU kernels from ",
              path, ": ", dlerror());
  using Entry = const KernelTable* (*)();
  auto entry = reinterpret_cast<Entry>(dlsym(handle, BLOCK_ATTN_KERNEL_TABLE_SYMBOL));
  TORCH_CHECK(entry != nullptr, "block_attn: ", path, " has no ", BLOCK_ATTN_KERNEL_TABLE_SYMBOL);
  const KernelTable* table = entry();
  TORCH_CHECK(table->version == kKernelTableVersion &&
                  table->params_bytes == static_cast<int>(sizeof(BackwardParams)),
              "block_attn: ", path, " was built from other sources than this extension; rebuild");
  return table;
}

}  // namespace

const std::vector<std::string>& known_capabilities() {
  static const std::vector<std::string> names{"avx512_bf16", "avx512", "avx2", "default"};
  return names;
}

bool cpu_supports(const std::string& capability) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512vl");
  if (capability == "avx2") return avx2;
  if (capability == "avx512") return avx512;
  if (capability == "avx512_bf16") return avx512 && __builtin_cpu_supports("avx512bf16");
#endif
  return capability == "default" || capability == compiled_kernel_table().capability;
}

std::string select_kernels(const std::map<std::string, std::string>& object_paths) {
  std::lock_guard<std::mutex> lock(selection_mutex);
  const std::string own = compiled_kernel_table().capability;
  compiled.clear();
  for (const std::string& name : known_capabilities()) {
    if (object_paths.count(name) || name == own) compiled.push_back(name);
  }
  if (std::find(compiled.begin(), compiled.end(), own) == compiled.end()) compiled.push_back(own);

  std::string chosen;
  const char* forced = std::getenv("BLOCK_ATTN_CPU_CAPABILITY");
  if (forced != nullptr && *forced != '\0') {
    chosen = forced;
    TORCH_CHECK_VALUE(std::find(compiled.begin(), compiled.end(), chosen) != compiled.end(),
                      "BLOCK_ATTN_CPU_CAPABILITY=", chosen,
                      " is not one this build has; it has: ", joined(compiled), " (one of ",
                      joined(known_capabilities()), " in a portable build)");
    TORCH_CHECK_VALUE(cpu_supports(chosen), "BLOCK_ATTN_CPU_CAPABILITY=", chosen,
                      " is not supported by this CPU; it supports: ", joined([&] {
                        std::vector<std::string> usable;
                        for (const auto& name : compiled)
                          if (cpu_supports(name)) usable.push_back(name);
                        return usable;
                      }()));
  } else {
    for (const std::string& name : compiled) {
      if (cpu_supports(name)) {
        chosen = name;
        break;
      }
    }
  }
  const auto path = object_paths.find(chosen);
  selected.store(chosen == own || path == object_paths.end() ? &compiled_kernel_table()
                                                             : load_table(chosen, path->second));
  return chosen;
}

const KernelTable& selected_kernels() {
  const KernelTable* table = selected.load();
  return table != nullptr ? *table : compiled_kernel_table();
}

std::vector<std::string> compiled_capabilities() {
  std::lock_guard<std::mutex> lock(selection_mutex);
  return compiled.empty() ? std::vector<std::string>{compiled_kernel_table().capability} : compiled;
}

}  // namespace block_attn::cpu
