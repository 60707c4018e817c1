// Registers the CPU kernels for the block_attn operators.
#include <torch/library.h>

#include "../attention_host.h"
#include "cpu_capability.h"
#include "huge_pages.h"

namespace block_attn {
namespace {

cpu::KernelDtype kernel_dtype(const at::Tensor& q) {
  switch (q.scalar_type()) {
    case at::kFloat:
      return cpu::kFloatKernel;
    case at::kDouble:
      return cpu::kDoubleKernel;
    case at::kBFloat16:
      return cpu::kBFloat16Kernel;
    case at::kHalf:
      return cpu::kHalfKernel;
    default:
      TORCH_CHECK_TYPE(false, "block_attn: no CPU kernel for ", q.scalar_type());
  }
}

// The CPU kernels index rows by the offsets, and reading them here costs nothing (they are in host
// memory), so a raw-op call that breaks their contract gets an error instead of wild reads: blocks
// lie in [0, seqlen) in order, none longer than max_seqlen.
void check_offset_values(const at::Tensor& cu_seqlens, int64_t seqlen, int64_t max_seqlen,
                         const char* name) {
  const int32_t* offsets = cu_seqlens.data_ptr<int32_t>();
  const int64_t count = cu_seqlens.size(0);
  TORCH_CHECK_VALUE(offsets[0] == 0, name, " must start at 0, got ", offsets[0]);
  for (int64_t j = 0; j + 1 < count; ++j) {
    const int64_t length = static_cast<int64_t>(offsets[j + 1]) - offsets[j];
    TORCH_CHECK_VALUE(length >= 0, name, " must be non-decreasing, got offset ", j + 1, " = ",
                      offsets[j + 1], " after ", offsets[j]);
    TORCH_CHECK_VALUE(length <= max_seqlen, name, ": block ", j, " has ", length,
                      " rows, more than its max_seqlen ", max_seqlen);
  }
  TORCH_CHECK_VALUE(offsets[count - 1] <= seqlen, name, " goes beyond the tensors' length ", seqlen,
                    ": last offset ", offsets[count - 1]);
}

void check_offsets_on_host(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens_q,
                           const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                           int64_t max_seqlen_k) {
  // The public API calls the query offsets cu_seqlens: name both.
  check_offset_values(cu_seqlens_q, q.size(2), max_seqlen_q,
                      "cu_seqlens_q (attention's cu_seqlens)");
  check_offset_values(cu_seqlens_k, k.size(2), max_seqlen_k, "cu_seqlens_k");
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
    double scale, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& alibi, double dropout_p,
    const std::optional<at::Tensor>& seed_offset, int64_t query_offset, int64_t key_offset) {
  const VariantArgs variants{window_left, window_right, softcap,      alibi,
                             dropout_p,   seed_offset,  query_offset, key_offset};
  check_forward_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale);
  check_variants(q, variants);
  check_offsets_on_host(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  auto [out, lse] = allocate_forward_outputs(q);
  cpu::advise_huge_pages(out);
  if (!forward_has_work(q)) return {out, lse};
  ForwardParams params = make_forward_params(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                             max_seqlen_q, max_seqlen_k, causal, scale);
  set_variants(params, variants);
  cpu::selected_kernels().forward[kernel_dtype(q)](params);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool causal, double scale, bool deterministic, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi, double dropout_p,
    const std::optional<at::Tensor>& seed_offset, int64_t query_offset, int64_t key_offset) {
  const VariantArgs variants{window_left, window_right, softcap,      alibi,
                             dropout_p,   seed_offset,  query_offset, key_offset};
  check_forward_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale);
  check_variants(q, variants);
  check_backward_inputs(grad_out, q, k, v, out, lse, grad_lse);
  check_offsets_on_host(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  auto [grad_q, grad_k, grad_v] = allocate_gradients(q, k, v);
  for (const at::Tensor& grad : {grad_q, grad_k, grad_v}) cpu::advise_huge_pages(grad);
  if (!backward_has_work(q, k)) return {grad_q, grad_k, grad_v};
  BackwardParams params = make_backward_params(
      grad_out, q, k, v, out, lse, grad_lse, grad_q, grad_k, grad_v, cu_seqlens_q, cu_seqlens_k,
      max_seqlen_q, max_seqlen_k, causal, scale, deterministic);
  set_variants(params, variants);
  cpu::selected_kernels().backward[kernel_dtype(q)](params);
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(block_attn, CPU, m) {
  m.impl("attention_forward", &attention_forward_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
}

}  // namespace block_attn
