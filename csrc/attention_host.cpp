#include "attention_host.h"

#include <cmath>
#include <limits>
#include <string>

#include "dropout_philox.h"

namespace block_attn {
namespace {

// Offsets and lengths are int32 in the kernels.
constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

// PyTorch's Python name of a dtype (torch.float32, not Float), which users know.
std::string dtype_name(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

void check_attention_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be 4-D (batch, heads, seqlen, head_dim), got ",
                    t.dim(), "-D shape ", t.sizes());
  const at::ScalarType dtype = t.scalar_type();
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      name, " has unsupported dtype ", dtype_name(dtype),
      "; supported: float32, float64, bfloat16, float16");
}

// The kernels' own requirement (the public API copies other layouts first).
void check_unit_last_stride(const at::Tensor& t, const char* name) {
  // A tensor without elements is never read, and .contiguous() leaves its strides as they are.
  TORCH_CHECK_VALUE(t.numel() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, name,
                    " must have unit stride in its last (head_dim) dimension, got stride ",
                    t.stride(-1));
}

void check_offsets(const at::Tensor& cu, const char* name, const at::Tensor& q) {
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, name, " must be int32, got ",
                   dtype_name(cu.scalar_type()));
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 2, name,
                    " must be 1-D with at least 2 offsets, got shape ", cu.sizes());
  TORCH_CHECK_VALUE(cu.device() == q.device(), name, " must be on q's device ", q.device(),
                    ", got ", cu.device());
  TORCH_CHECK_VALUE(cu.is_contiguous(), name, " must be contiguous");
}

void fill_strides(const at::Tensor& t, int64_t& batch, int64_t& head, int64_t& row) {
  batch = t.stride(0);
  head = t.stride(1);
  row = t.stride(2);
}

}  // namespace

void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_attention_tensor(q, "q");
  check_attention_tensor(k, "k");
  check_attention_tensor(v, "v");
  TORCH_CHECK_TYPE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                   "q, k and v must share a dtype, got ", dtype_name(q.scalar_type()), ", ",
                   dtype_name(k.scalar_type()), ", ", dtype_name(v.scalar_type()));
  TORCH_CHECK_VALUE(q.device() == k.device() && q.device() == v.device(),
                    "q, k and v must be on one device, got ", q.device(), ", ", k.device(), ", ",
                    v.device());
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "k and v must have the same shape, got ", k.sizes(),
                    " and ", v.sizes());
  TORCH_CHECK_VALUE(q.size(0) == k.size(0), "batch size mismatch: q has B = ", q.size(0),
                    ", k and v have B = ", k.size(0));
  TORCH_CHECK_VALUE(q.size(3) == k.size(3), "head_dim mismatch: q has D = ", q.size(3),
                    ", k and v have D = ", k.size(3));
  TORCH_CHECK_VALUE(q.size(3) > 0, "head_dim D must be at least 1, got 0");
  TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
                    "the number of query heads must be a multiple of the number of kv heads "
                    "(Hq % Hkv == 0), got Hq = ",
                    q.size(1), ", Hkv = ", k.size(1));
  TORCH_CHECK_VALUE(q.size(2) <= kInt32Max && k.size(2) <= kInt32Max,
                    "sequence lengths must fit in int32, got Nq = ", q.size(2),
                    ", Nk = ", k.size(2));
}

void check_forward_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                          int64_t max_seqlen_q, int64_t max_seqlen_k, double scale) {
  check_attention_inputs(q, k, v);
  check_unit_last_stride(q, "q");
  check_unit_last_stride(k, "k");
  check_unit_last_stride(v, "v");
  check_offsets(cu_seqlens_q, "cu_seqlens_q", q);
  check_offsets(cu_seqlens_k, "cu_seqlens_k", q);
  TORCH_CHECK_VALUE(cu_seqlens_q.size(0) == cu_seqlens_k.size(0),
                    "cu_seqlens_q and cu_seqlens_k must describe the same number of blocks, got ",
                    cu_seqlens_q.size(0) - 1, " and ", cu_seqlens_k.size(0) - 1);
  TORCH_CHECK_VALUE(max_seqlen_q >= 0 && max_seqlen_k >= 0 && max_seqlen_q <= kInt32Max &&
                        max_seqlen_k <= kInt32Max,
                    "max_seqlen_q and max_seqlen_k must be in [0, ", kInt32Max, "], got ",
                    max_seqlen_q, " and ", max_seqlen_k);
  check_scale(scale);
}

void check_scale(double scale) {
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);
}

void check_variants(const at::Tensor& q, const VariantArgs& variants) {
  TORCH_CHECK_VALUE(variants.window_left >= -1 && variants.window_right >= -1 &&
                        variants.window_left <= kInt32Max && variants.window_right <= kInt32Max,
                    "window_size sides must be in [0, ", kInt32Max, "], or -1 for unbounded, got (",
                    variants.window_left, ", ", variants.window_right, ")");
  TORCH_CHECK_VALUE(std::isfinite(variants.softcap) && variants.softcap >= 0,
                    "softcap must be a finite float >= 0 (0 disables it), got ", variants.softcap);
  TORCH_CHECK_VALUE(variants.dropout_p >= 0 && variants.dropout_p < 1,
                    "dropout_p must be in [0, 1), got ", variants.dropout_p);
  TORCH_CHECK_VALUE((variants.query_offset == -1 && variants.key_offset == -1) ||
                        (variants.query_offset >= 0 && variants.key_offset >= 0 &&
                         variants.query_offset <= kInt32Max && variants.key_offset <= kInt32Max),
                    "query_offset and key_offset must both be -1 (not given) or both in [0, ",
                    kInt32Max, "], got ", variants.query_offset, " and ", variants.key_offset);
  if (variants.dropout_p > 0) {
    TORCH_CHECK_VALUE(variants.dropout_seed_offset.has_value(),
                      "dropout_p > 0 needs dropout_seed_offset, the (seed, offset) of the mask");
    const at::Tensor& seed_offset = *variants.dropout_seed_offset;
    TORCH_CHECK_VALUE(seed_offset.scalar_type() == at::kLong && seed_offset.dim() == 1 &&
                          seed_offset.size(0) == 2 && seed_offset.is_contiguous(),
                      "dropout_seed_offset must be a contiguous int64 tensor of shape (2,), got ",
                      dtype_name(seed_offset.scalar_type()), " ", seed_offset.sizes());
    TORCH_CHECK_VALUE(seed_offset.device() == q.device(), "dropout_seed_offset must be on q's ",
                      "device ", q.device(), ", got ", seed_offset.device());
  }
  if (!variants.alibi_slopes.has_value()) return;
  const at::Tensor& slopes = *variants.alibi_slopes;
  TORCH_CHECK_TYPE(slopes.scalar_type() == at::kFloat, "alibi_slopes must be float32, got ",
                   dtype_name(slopes.scalar_type()));
  const bool per_head = slopes.dim() == 1 && slopes.size(0) == q.size(1);
  const bool per_batch =
      slopes.dim() == 2 && slopes.size(0) == q.size(0) && slopes.size(1) == q.size(1);
  TORCH_CHECK_VALUE(per_head || per_batch, "alibi_slopes must have shape (Hq,) = (", q.size(1),
                    ",) or (B, Hq) = (", q.size(0), ", ", q.size(1), "), got ", slopes.sizes());
  TORCH_CHECK_VALUE(slopes.device() == q.device(), "alibi_slopes must be on q's device ",
                    q.device(), ", got ", slopes.device());
  TORCH_CHECK_VALUE(slopes.stride(-1) == 1,
                    "alibi_slopes must have unit stride in its last "
                    "dimension, got stride ",
                    slopes.stride(-1));
}

void set_variants(ForwardParams& p, const VariantArgs& variants) {
  p.window_left = static_cast<int>(variants.window_left);
  p.window_right = static_cast<int>(variants.window_right);
  p.softcap = variants.softcap;
  p.query_offset = variants.query_offset;
  p.key_offset = variants.key_offset;
  if (variants.alibi_slopes.has_value()) {
    const at::Tensor& slopes = *variants.alibi_slopes;
    p.alibi_slopes = slopes.data_ptr<float>();
    p.alibi_batch_stride = slopes.dim() == 2 ? slopes.stride(0) : 0;
  }
  if (variants.dropout_p > 0) {
    p.dropout_seed_offset = variants.dropout_seed_offset->data_ptr<int64_t>();
    p.dropout_threshold = dropout_threshold(variants.dropout_p);
    p.dropout_scale = 1 / (1 - variants.dropout_p);
  }
}

void check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                           const std::optional<at::Tensor>& grad_lse) {
  check_attention_tensor(grad_out, "grad_out");
  check_attention_tensor(out, "out");
  check_unit_last_stride(grad_out, "grad_out");
  check_unit_last_stride(out, "out");
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
                    "grad_out and out must have q's shape ", q.sizes(), ", got ", grad_out.sizes(),
                    " and ", out.sizes());
  TORCH_CHECK_TYPE(
      grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
      "grad_out and out must have q's dtype ", q.scalar_type());
  const at::ScalarType lse_dtype = lse_dtype_for(q);
  const char* lse_dtype_name = lse_dtype == at::kDouble ? "float64" : "float32";
  TORCH_CHECK_VALUE(
      lse.scalar_type() == lse_dtype && lse.is_contiguous() && lse.dim() == 3 &&
          lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
      "lse must be a contiguous ", lse_dtype_name,
      " tensor of shape (batch, heads_q, seqlen_q), got ", lse.scalar_type(), " ", lse.sizes());
  if (grad_lse.has_value()) {
    TORCH_CHECK_VALUE(grad_lse->scalar_type() == lse_dtype && grad_lse->sizes() == lse.sizes() &&
                          grad_lse->is_contiguous(),
                      "grad_lse must be a contiguous ", lse_dtype_name, " tensor with lse's shape ",
                      lse.sizes());
  }
}

ForwardParams make_forward_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& out, const at::Tensor& lse,
                                  const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                  int64_t max_seqlen_q, int64_t max_seqlen_k, bool is_causal,
                                  double scale) {
  ForwardParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  fill_strides(q, p.q_batch_stride, p.q_head_stride, p.q_row_stride);
  fill_strides(k, p.k_batch_stride, p.k_head_stride, p.k_row_stride);
  fill_strides(v, p.v_batch_stride, p.v_head_stride, p.v_row_stride);
  fill_strides(out, p.out_batch_stride, p.out_head_stride, p.out_row_stride);
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_seqlens_k.data_ptr<int32_t>();
  p.num_blocks = static_cast<int>(cu_seqlens_q.size(0) - 1);
  p.max_seqlen_q = static_cast<int>(max_seqlen_q);
  p.max_seqlen_k = static_cast<int>(max_seqlen_k);
  p.batch = static_cast<int>(q.size(0));
  p.heads_q = static_cast<int>(q.size(1));
  p.heads_kv = static_cast<int>(k.size(1));
  p.seqlen_q = static_cast<int>(q.size(2));
  p.seqlen_k = static_cast<int>(k.size(2));
  p.head_dim = static_cast<int>(q.size(3));
  p.scale = scale;
  p.is_causal = is_causal;
  return p;
}

BackwardParams make_backward_params(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_v,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool is_causal, double scale, bool deterministic) {
  BackwardParams p{};
  static_cast<ForwardParams&>(p) = make_forward_params(
      q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale);
  p.grad_out = grad_out.data_ptr();
  p.grad_lse = grad_lse.has_value() ? grad_lse->data_ptr() : nullptr;
  p.grad_q = grad_q.data_ptr();
  p.grad_k = grad_k.data_ptr();
  p.grad_v = grad_v.data_ptr();
  fill_strides(grad_out, p.grad_out_batch_stride, p.grad_out_head_stride, p.grad_out_row_stride);
  fill_strides(grad_q, p.grad_q_batch_stride, p.grad_q_head_stride, p.grad_q_row_stride);
  fill_strides(grad_k, p.grad_k_batch_stride, p.grad_k_head_stride, p.grad_k_row_stride);
  fill_strides(grad_v, p.grad_v_batch_stride, p.grad_v_head_stride, p.grad_v_row_stride);
  p.deterministic = deterministic;
  return p;
}

at::Tensor empty_output_like(const at::Tensor& q) {
  // empty_like keeps q's dense layout (including a transposed (B, N, H, D) view).
  return at::empty_like(q);
}

at::ScalarType lse_dtype_for(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor empty_lse_for(const at::Tensor& q) {
  return at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(lse_dtype_for(q)));
}

std::tuple<at::Tensor, at::Tensor> allocate_forward_outputs(const at::Tensor& q) {
  at::Tensor out = empty_output_like(q);
  at::Tensor lse = empty_lse_for(q);
  if (!forward_has_work(q)) lse.fill_(-std::numeric_limits<double>::infinity());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_gradients(const at::Tensor& q,
                                                                  const at::Tensor& k,
                                                                  const at::Tensor& v) {
  at::Tensor grad_q = at::empty_like(q);
  at::Tensor grad_k = at::empty_like(k);
  at::Tensor grad_v = at::empty_like(v);
  if (!backward_has_work(q, k)) {
    grad_q.zero_();
    grad_k.zero_();
    grad_v.zero_();
  }
  return {grad_q, grad_k, grad_v};
}

}  // namespace block_attn
