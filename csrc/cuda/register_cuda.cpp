// Registers the CUDA kernels for the block_attn operators: checks, workspace allocation and
// launch on the current stream of q's device. Nothing here waits on the device, so the ops can be
// captured in CUDA graphs. Also Python's plan functions (python_plans.h), from the same plans.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "../attention_host.h"
#include "launch.h"
#include "python_plans.h"

namespace block_attn {
namespace {

cuda::DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kDouble:
      return cuda::DType::kFloat64;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "q has unsupported dtype ", t,
                  " on CUDA; supported: float32, float64, float16, bfloat16");
  }
}

// Limits that only the CUDA kernels have (grid dimensions, register tiles).
void check_cuda_limits(const at::Tensor& q, const at::Tensor& cu_seqlens_q) {
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor, got device ", q.device());
  TORCH_CHECK(q.size(3) <= cuda::kMaxHeadDim, "head_dim must be at most ", cuda::kMaxHeadDim,
              " on CUDA, got ", q.size(3));
  constexpr int64_t kMaxGridYZ = 65535;
  TORCH_CHECK(cu_seqlens_q.size(0) - 1 <= kMaxGridYZ, "at most ", kMaxGridYZ,
              " blocks are supported on CUDA, got ", cu_seqlens_q.size(0) - 1);
  TORCH_CHECK(q.size(0) * q.size(1) <= kMaxGridYZ, "batch * heads_q must be at most ", kMaxGridYZ,
              " on CUDA, got ", q.size(0) * q.size(1));
}

// An uninitialised float32 scratch buffer of `elements` on q's device (from the caching
// allocator, so graph capture works), or an undefined tensor for none.
at::Tensor float_scratch(const at::Tensor& q, size_t elements) {
  if (elements == 0) return {};
  return at::empty({static_cast<int64_t>(elements)}, q.options().dtype(at::kFloat));
}

float* data_or_null(const at::Tensor& scratch) {
  return scratch.defined() ? scratch.data_ptr<float>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
    double scale, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& alibi, double dropout_p,
    const std::optional<at::Tensor>& seed_offset, int64_t query_offset, int64_t key_offset) {
  const VariantArgs variants{window_left, window_right, softcap,      alibi,
                             dropout_p,   seed_offset,  query_offset, key_offset};
  check_forward_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale);
  check_variants(q, variants);
  check_cuda_limits(q, cu_seqlens_q);
  const c10::cuda::CUDAGuard device_guard(q.device());
  auto [out, lse] = allocate_forward_outputs(q);
  if (!forward_has_work(q)) return {out, lse};
  ForwardParams params = make_forward_params(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                             max_seqlen_q, max_seqlen_k, causal, scale);
  set_variants(params, variants);
  const cuda::DType dtype = to_kernel_dtype(q.scalar_type());
  cuda::ForwardPlan plan;
  C10_CUDA_CHECK(cuda::plan_forward(params, dtype, plan));
  const at::Tensor split_partials = float_scratch(q, plan.split_partials_elements);
  cuda::ForwardWorkspace workspace{};
  workspace.split_partials = data_or_null(split_partials);
  const cudaError_t err =
      cuda::launch_forward(params, plan, workspace, dtype, at::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(err);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool causal, double scale, bool deterministic, int64_t window_left,
    int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi, double dropout_p,
    const std::optional<at::Tensor>& seed_offset, int64_t query_offset, int64_t key_offset) {
  const VariantArgs variants{window_left, window_right, softcap,      alibi,
                             dropout_p,   seed_offset,  query_offset, key_offset};
  check_forward_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale);
  check_backward_inputs(grad_out, q, k, v, out, lse, grad_lse);
  check_variants(q, variants);
  check_cuda_limits(q, cu_seqlens_q);
  TORCH_CHECK(
      grad_out.device() == q.device() && out.device() == q.device() && lse.device() == q.device(),
      "grad_out, out and lse must be on q's device ", q.device());
  // The kernels read grad_lse as a contiguous (batch, heads_q, seqlen_q) array.
  std::optional<at::Tensor> grad_lse_contiguous;
  if (grad_lse.has_value()) {
    TORCH_CHECK(grad_lse->device() == q.device(), "grad_lse must be on q's device ", q.device(),
                ", got ", grad_lse->device());
    grad_lse_contiguous = grad_lse->contiguous();
  }
  const c10::cuda::CUDAGuard device_guard(q.device());
  auto [grad_q, grad_k, grad_v] = allocate_gradients(q, k, v);
  if (!backward_has_work(q, k)) return {grad_q, grad_k, grad_v};
  const cuda::DType dtype = to_kernel_dtype(q.scalar_type());
  // Delta has lse's shape and dtype: the accumulator type.
  at::Tensor delta = empty_lse_for(q);
  BackwardParams params = make_backward_params(
      grad_out, q, k, v, out, lse, grad_lse_contiguous, grad_q, grad_k, grad_v, cu_seqlens_q,
      cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, deterministic);
  set_variants(params, variants);
  cuda::BackwardPlan plan;
  C10_CUDA_CHECK(cuda::plan_backward(params, dtype, plan));
  const at::Tensor dq_accumulator = float_scratch(q, plan.dq_accumulator_elements);
  cuda::BackwardWorkspace workspace{};
  workspace.delta = delta.data_ptr();
  workspace.dq_accumulator = data_or_null(dq_accumulator);
  const cudaError_t err =
      cuda::launch_backward(params, plan, workspace, dtype, at::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(err);
  return {grad_q, grad_k, grad_v};
}

// The plan attention_forward_cuda makes for these inputs (with out allocated as it allocates it).
pybind11::dict plan_forward_for(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal) {
  constexpr double kScale = 1.0;  // the plan does not depend on it
  check_forward_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, kScale);
  check_cuda_limits(q, cu_seqlens_q);
  const c10::cuda::CUDAGuard device_guard(q.device());
  auto [out, lse] = allocate_forward_outputs(q);
  const ForwardParams params = make_forward_params(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                                   max_seqlen_q, max_seqlen_k, causal, kScale);
  cuda::ForwardPlan plan;
  C10_CUDA_CHECK(cuda::plan_forward(params, to_kernel_dtype(q.scalar_type()), plan));
  pybind11::dict result;
  result["path"] = cuda::kernel_path_name(plan.path);
  result["decode_splits"] = plan.decode_splits;
  result["split_partials_elements"] = plan.split_partials_elements;
  return result;
}

// The plan attention_backward_cuda makes for these inputs, with out, grad_out and the gradients
// allocated as the ops allocate them.
pybind11::dict plan_backward_for(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                 int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
                                 bool deterministic) {
  constexpr double kScale = 1.0;  // the plan does not depend on it
  check_forward_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, kScale);
  check_cuda_limits(q, cu_seqlens_q);
  const c10::cuda::CUDAGuard device_guard(q.device());
  auto [out, lse] = allocate_forward_outputs(q);
  const at::Tensor grad_out = empty_output_like(q);
  auto [grad_q, grad_k, grad_v] = allocate_gradients(q, k, v);
  const BackwardParams params = make_backward_params(
      grad_out, q, k, v, out, lse, std::nullopt, grad_q, grad_k, grad_v, cu_seqlens_q, cu_seqlens_k,
      max_seqlen_q, max_seqlen_k, causal, kScale, deterministic);
  cuda::BackwardPlan plan;
  C10_CUDA_CHECK(cuda::plan_backward(params, to_kernel_dtype(q.scalar_type()), plan));
  pybind11::dict result;
  result["path"] = cuda::kernel_path_name(plan.path);
  result["max_shared_bytes"] = plan.max_shared_bytes;
  result["dq_accumulator_elements"] = plan.dq_accumulator_elements;
  return result;
}

}  // namespace

void define_plan_functions(pybind11::module_& module) {
  using pybind11::arg;
  module.def("plan_forward", &plan_forward_for,
             "The CUDA kernel attention_forward runs for these inputs: a dict of path ('simple', "
             "'tensor_core', 'hopper' or 'decode'), decode_splits and split_partials_elements.",
             arg("q"), arg("k"), arg("v"), arg("cu_seqlens_q"), arg("cu_seqlens_k"),
             arg("max_seqlen_q"), arg("max_seqlen_k"), arg("causal"));
  module.def("plan_backward", &plan_backward_for,
             "The CUDA kernels attention_backward runs for these inputs: a dict of path ('simple', "
             "'tensor_core' or 'hopper'), max_shared_bytes and dq_accumulator_elements.",
             arg("q"), arg("k"), arg("v"), arg("cu_seqlens_q"), arg("cu_seqlens_k"),
             arg("max_seqlen_q"), arg("max_seqlen_k"), arg("causal"), arg("deterministic"));
}

TORCH_LIBRARY_IMPL(block_attn, CUDA, m) {
  m.impl("attention_forward", &attention_forward_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
}

}  // namespace block_attn
