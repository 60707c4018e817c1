// The CTA's dynamic shared memory, whose size each launch sets: declared once here for every
// kernel, which carves its tiles out of it, and for the host emulator, which defines it.
#pragma once

#include <cuda_runtime.h>

namespace block_attn::cuda {

extern __shared__ __align__(16) unsigned char smem_raw[];

}  // namespace block_attn::cuda
