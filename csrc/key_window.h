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

// Local query i of a block stands at i' = i + len_k - len_q + shift and sees local key t iff
// -right <= i' - t <= left (a side of -1 is unbounded; causal makes right 0). shift is 0 but for
// calls with global positions (block_window). The keys a query sees, and the queries that see a
// key, are one interval each; the arithmetic is in int64, as i' + left passes INT32_MAX near the
// int32 edge.
struct KeyWindow {
  int64_t left = -1;
  int64_t right = -1;
  int64_t shift = 0;

  BLOCK_ATTN_HOST_DEVICE bool masks() const { return left >= 0 || right >= 0; }
};

// The window of a block whose queries start at row q_start and keys at row k_start of the call.
BLOCK_ATTN_HOST_DEVICE inline KeyWindow block_window(const ForwardParams& p, int64_t q_start,
                                                     int64_t k_start, int len_q, int len_k) {
  KeyWindow w{p.window_left, p.is_causal ? 0 : p.window_right, 0};
  if (p.query_offset >= 0) {
    w.shift = (p.query_offset + q_start) - (p.key_offset + k_start) - (len_k - len_q);
  }
  return w;
}

// Local query i sees keys [window_key_begin, window_key_end).
BLOCK_ATTN_HOST_DEVICE inline int window_key_begin(int i, int len_q, int len_k, KeyWindow w) {
  if (w.left < 0) return 0;
  return clamp_to_length(static_cast<int64_t>(i) + len_k - len_q + w.shift - w.left, len_k);
}
BLOCK_ATTN_HOST_DEVICE inline int window_key_end(int i, int len_q, int len_k, KeyWindow w) {
  if (w.right < 0) return len_k;
  return clamp_to_length(static_cast<int64_t>(i) + len_k - len_q + w.shift + w.right + 1, len_k);
}

// Local key t is seen by queries [window_query_begin, window_query_end).
BLOCK_ATTN_HOST_DEVICE inline int window_query_begin(int t, int len_q, int len_k, KeyWindow w) {
  if (w.right < 0) return 0;
  return clamp_to_length(static_cast<int64_t>(t) - w.right - len_k + len_q - w.shift, len_q);
}
BLOCK_ATTN_HOST_DEVICE inline int window_query_end(int t, int len_q, int len_k, KeyWindow w) {
  if (w.left < 0) return len_q;
  return clamp_to_length(static_cast<int64_t>(t) + w.left + 1 - len_k + len_q - w.shift, len_q);
}

// i' - t: how far key t stands behind query i (negative: ahead), for ALiBi.
BLOCK_ATTN_HOST_DEVICE inline int64_t key_distance(int i, int t, int len_q, int len_k,
                                                   KeyWindow w) {
  return static_cast<int64_t>(i) + len_k - len_q + w.shift - t;
}

// The global query and key rows dropout keys its mask by, from the call's rows.
BLOCK_ATTN_HOST_DEVICE inline int64_t dropout_query_row(const ForwardParams& p, int64_t row) {
  return p.query_offset >= 0 ? p.query_offset + row : row;
}
BLOCK_ATTN_HOST_DEVICE inline int64_t dropout_key_row(const ForwardParams& p, int64_t row) {
  return p.key_offset >= 0 ? p.key_offset + row : row;
}

}  // namespace block_attn
