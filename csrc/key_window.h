// Which keys each query of a block sees under a sliding window or the causal mask: one rule for
// the CPU and CUDA kernels. No ATen, so device code can include it.
#pragma once

#include <cstdint>

#include "attention_params.h"
#include "host_device.h"

namespace block_attn {

// x clamped to [0, limit]; x may lie outside int32 when it is an offset plus a window side.
BLOCK_ATTN_HOST_DEVICE inline int clamp_to_length(int64_t x, int limit) {
  return x < 0 ? 0 : (x > limit ? limit : static_cast<int>(x));
}

// Local query i of a block stands at i' = i + len_k - len_q and sees local key t iff
// -right <= i' - t <= left (a side of -1 is unbounded; causal makes right 0). The keys a query
// sees, and the queries that see a key, are one interval each; the arithmetic is in int64, as
// i' + left passes INT32_MAX near the int32 edge.
struct KeyWindow {
  int64_t left = -1;
  int64_t right = -1;

  BLOCK_ATTN_HOST_DEVICE bool masks() const { return left >= 0 || right >= 0; }
};

BLOCK_ATTN_HOST_DEVICE inline KeyWindow key_window(const ForwardParams& p) {
  return {p.window_left, p.is_causal ? 0 : p.window_right};
}

// Local query i sees keys [window_key_begin, window_key_end).
BLOCK_ATTN_HOST_DEVICE inline int window_key_begin(int i, int len_q, int len_k, KeyWindow w) {
  if (w.left < 0) return 0;
  return clamp_to_length(static_cast<int64_t>(i) + len_k - len_q - w.left, len_k);
}
BLOCK_ATTN_HOST_DEVICE inline int window_key_end(int i, int len_q, int len_k, KeyWindow w) {
  if (w.right < 0) return len_k;
  return clamp_to_length(static_cast<int64_t>(i) + len_k - len_q + w.right + 1, len_k);
}

// Local key t is seen by queries [window_query_begin, window_query_end).
BLOCK_ATTN_HOST_DEVICE inline int window_query_begin(int t, int len_q, int len_k, KeyWindow w) {
  if (w.right < 0) return 0;
  return clamp_to_length(static_cast<int64_t>(t) - w.right - len_k + len_q, len_q);
}
BLOCK_ATTN_HOST_DEVICE inline int window_query_end(int t, int len_q, int len_k, KeyWindow w) {
  if (w.left < 0) return len_q;
  return clamp_to_length(static_cast<int64_t>(t) + w.left + 1 - len_k + len_q, len_q);
}

}  // namespace block_attn
