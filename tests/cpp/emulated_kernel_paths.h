// Which kernels plan_forward and plan_backward pick, on emulated devices (test_cuda_emulated).
#pragma once

namespace block_attn::emulated_test {

// Checks the planned kernel path, scratch sizes and refusals for a table of problems on emulated
// sm_90, sm_86, a small-shared-memory sm_80 and sm_75. Returns the number of failures.
int check_kernel_paths();

}  // namespace block_attn::emulated_test
