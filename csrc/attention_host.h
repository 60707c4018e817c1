// Host-side checks and Params construction shared by every device's registration.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "attention_params.h"

namespace block_attn {

// The one place that checks the operators' tensor arguments: the Python layer checks only what
// it must read before the call (tensors of four dimensions) and what C++ cannot see (Python
// types, lists, keyword combinations). Every message names the argument; a wrong dtype raises
// TypeError in Python, every other bad value ValueError.
void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);
void check_scale(double scale);

void check_forward_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                          int64_t max_seqlen_q, int64_t max_seqlen_k, double scale);

ForwardParams make_forward_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& out, const at::Tensor& lse,
                                  const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                  int64_t max_seqlen_q, int64_t max_seqlen_k, bool is_causal,
                                  double scale);

// The variants' operator arguments (block_attn/variants.py); the defaults turn them off.
struct VariantArgs {
  int64_t window_left = -1;
  int64_t window_right = -1;
  double softcap = 0;
  std::optional<at::Tensor> alibi_slopes;
  double dropout_p = 0;
  std::optional<at::Tensor> dropout_seed_offset;  // (seed, offset), int64, when dropout_p > 0
  int64_t query_offset = -1;  // global positions of the call's first query and key rows
  int64_t key_offset = -1;
};

void check_variants(const at::Tensor& q, const VariantArgs& variants);

// Copies checked variants into the params (their tensors must outlive the kernels).
void set_variants(ForwardParams& p, const VariantArgs& variants);

void check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                           const std::optional<at::Tensor>& grad_lse);

BackwardParams make_backward_params(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool is_causal, double scale, bool deterministic);

// Output of the forward: same shape, dtype and memory layout as q (a transposed (B, N, H, D)
// view stays transposed), and lse of shape (B, Hq, Nq): float64 for float64 q, else float32.
at::Tensor empty_output_like(const at::Tensor& q);
at::ScalarType lse_dtype_for(const at::Tensor& q);
at::Tensor empty_lse_for(const at::Tensor& q);

// out and lse for a forward on q's device; when q has no elements there is nothing to compute,
// and lse is already filled with -inf.
std::tuple<at::Tensor, at::Tensor> allocate_forward_outputs(const at::Tensor& q);

// grad_q, grad_k and grad_v shaped like q, k and v; when q or k has no elements there is nothing
// to compute, and they are already zero.
std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_gradients(const at::Tensor& q,
                                                                  const at::Tensor& k,
                                                                  const at::Tensor& v);

// Whether the forward / backward kernels have any work (see the allocations above).
inline bool forward_has_work(const at::Tensor& q) {
  return q.numel() != 0;
}
inline bool backward_has_work(const at::Tensor& q, const at::Tensor& k) {
  return q.numel() != 0 && k.numel() != 0;
}

}  // namespace block_attn
