// Plain description of one attention call, shared by the CPU and CUDA kernels.
// No ATen types: CUDA kernel files include only this header.
#pragma once

#include <cstdint>

namespace block_attn {

// Forward inputs and outputs. Tensors are (batch, heads, seqlen, head_dim) with unit stride in
// head_dim; the other strides are in elements. Block j pairs queries
// [cu_seqlens_q[j], cu_seqlens_q[j+1]) with keys [cu_seqlens_k[j], cu_seqlens_k[j+1]).
// With is_causal, local query i of a block attends local key t iff
// t <= i + (block_len_k - block_len_q) (bottom-right aligned). A query with no allowed key
// gets out = 0 and lse = -inf.
struct ForwardParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  // (batch, heads_q, seqlen_q), contiguous; float64 for float64 inputs (so their gradients are
  // not limited by a float32 lse), else float32.
  void* lse;

  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int64_t out_batch_stride, out_head_stride, out_row_stride;

  const int32_t* cu_seqlens_q;  // num_blocks + 1 offsets, on the kernel's device
  const int32_t* cu_seqlens_k;
  int num_blocks;
  int max_seqlen_q;  // longest query block
  int max_seqlen_k;  // longest key block

  int batch;
  int heads_q;
  int heads_kv;  // heads_q % heads_kv == 0; query head h reads kv head h / (heads_q / heads_kv)
  int seqlen_q;
  int seqlen_k;
  int head_dim;

  double scale;  // double so float64 inputs are not rounded through float32
  bool is_causal;

  // Variants (block_attn/variants.py). Local query i stands at i' = i + len_k - len_q in its key
  // block and may attend local key t iff -window_right <= i' - t <= window_left; a side of -1 is
  // unbounded, and is_causal makes the right side 0. The defaults turn every variant off.
  int window_left = -1;
  int window_right = -1;
  double softcap = 0;  // > 0: a scaled score s becomes softcap * tanh(s / softcap)
  // ALiBi: -slope * |i' - t| is added to the (capped) score. Float32 slopes, read at
  // b * alibi_batch_stride + h (stride 0: one slope per head), or nullptr for none.
  const float* alibi_slopes = nullptr;
  int64_t alibi_batch_stride = 0;
  // Dropout of the normalised probabilities (block_attn/dropout_mask.py): (seed, offset) on the
  // kernel's device, or nullptr for none. A probability is kept iff its Philox word is
  // >= dropout_threshold, and kept ones are scaled by dropout_scale = 1 / (1 - p).
  const int64_t* dropout_seed_offset = nullptr;
  uint32_t dropout_threshold = 0;
  double dropout_scale = 1;
  // Global positions, for a call on pieces of a longer sequence (context parallelism): query row r
  // and key row s of this call stand at query_offset + r and key_offset + s. Given (>= 0), the
  // causal mask, the window and ALiBi measure i' - t between those positions instead of aligning
  // each block bottom-right, and dropout keys its mask by them; -1: not given.
  int64_t query_offset = -1;
  int64_t key_offset = -1;
};

// Backward: the forward's fields plus the gradients. grad_lse may be null (treated as zero).
struct BackwardParams : ForwardParams {
  const void* grad_out;
  const void* grad_lse;  // lse's dtype and shape, contiguous, or nullptr
  void* grad_q;
  void* grad_k;
  void* grad_v;

  int64_t grad_out_batch_stride, grad_out_head_stride, grad_out_row_stride;
  int64_t grad_q_batch_stride, grad_q_head_stride, grad_q_row_stride;
  int64_t grad_k_batch_stride, grad_k_head_stride, grad_k_row_stride;
  int64_t grad_v_batch_stride, grad_v_head_stride, grad_v_row_stride;

  bool deterministic;  // CUDA: no atomics in the reductions; CPU kernels are always deterministic
};

}  // namespace block_attn
