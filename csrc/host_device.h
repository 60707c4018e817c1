// BLOCK_ATTN_HOST_DEVICE marks the small helpers that host C++ and CUDA device code share.
#pragma once

#ifdef __CUDACC__
#define BLOCK_ATTN_HOST_DEVICE __host__ __device__
#else
#define BLOCK_ATTN_HOST_DEVICE
#endif
