// Rows after the last offset belong to no block (offsets may end before the tensors' length, as
// in fixed-size buffers holding fewer valid tokens). The kernels visit blocks only, so these rows
// of their outputs are written here: out = 0 and lse = -inf for such queries, zero gradients for
// such queries and keys.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <limits>

#include "../attention_params.h"

namespace block_attn::cpu {

// Sets rows [first_row, rows) of every (batch, head) of a strided (batch, heads, rows, head_dim)
// tensor to `value`.
template <typename scalar_t>
void fill_rows_from(void* data, int64_t batch_stride, int64_t head_stride, int64_t row_stride,
                    int batch, int heads, int first_row, int rows, int head_dim, scalar_t value) {
  if (first_row >= rows) return;
  const int64_t tail = rows - first_row;
  at::parallel_for(0, static_cast<int64_t>(batch) * heads * tail, 1024,
                   [&](int64_t begin, int64_t end) {
                     for (int64_t i = begin; i < end; ++i) {
                       const int64_t bh = i / tail, row = first_row + i % tail;
                       scalar_t* dst = static_cast<scalar_t*>(data) + (bh / heads) * batch_stride +
                                       (bh % heads) * head_stride + row * row_stride;
                       for (int d = 0; d < head_dim; ++d) dst[d] = value;
                     }
                   });
}

template <typename scalar_t, typename acc>
void write_rows_after_blocks(const ForwardParams& p) {
  const int first = p.cu_seqlens_q[p.num_blocks];
  fill_rows_from<scalar_t>(p.out, p.out_batch_stride, p.out_head_stride, p.out_row_stride, p.batch,
                           p.heads_q, first, p.seqlen_q, p.head_dim, scalar_t(0));
  // lse is contiguous (batch, heads, rows): a tensor of head_dim 1.
  fill_rows_from<acc>(p.lse, static_cast<int64_t>(p.heads_q) * p.seqlen_q, p.seqlen_q, 1, p.batch,
                      p.heads_q, first, p.seqlen_q, 1, -std::numeric_limits<acc>::infinity());
}

template <typename scalar_t>
void zero_gradient_rows_after_blocks(const BackwardParams& p) {
  const int first_q = p.cu_seqlens_q[p.num_blocks], first_k = p.cu_seqlens_k[p.num_blocks];
  fill_rows_from<scalar_t>(p.grad_q, p.grad_q_batch_stride, p.grad_q_head_stride,
                           p.grad_q_row_stride, p.batch, p.heads_q, first_q, p.seqlen_q, p.head_dim,
                           scalar_t(0));
  fill_rows_from<scalar_t>(p.grad_k, p.grad_k_batch_stride, p.grad_k_head_stride,
                           p.grad_k_row_stride, p.batch, p.heads_kv, first_k, p.seqlen_k,
                           p.head_dim, scalar_t(0));
  fill_rows_from<scalar_t>(p.grad_v, p.grad_v_batch_stride, p.grad_v_head_stride,
                           p.grad_v_row_stride, p.batch, p.heads_kv, first_k, p.seqlen_k,
                           p.head_dim, scalar_t(0));
}

}  // namespace block_attn::cpu
