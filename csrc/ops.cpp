// The one place that declares every block_attn operator schema, plus the pybind11 module that
// exposes what is not an operator (build information; in CUDA builds, the kernel plans).
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>

#include "attention_host.h"
#include "cpu/cpu_capability.h"

#ifdef BLOCK_ATTN_WITH_CUDA
#include "cuda/python_plans.h"
#endif

#ifndef BLOCK_ATTN_CUDA_ARCHS
#define BLOCK_ATTN_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(block_attn, m) {
  // Block j pairs queries [cu_seqlens_q[j], cu_seqlens_q[j+1]) with keys
  // [cu_seqlens_k[j], cu_seqlens_k[j+1]); causal masking is bottom-right aligned per block. The
  // trailing arguments are the variants (block_attn/variants.py), off by default; query_offset
  // and key_offset place the call's rows in a longer sequence for them (context parallelism).
  m.def(
      "attention_forward(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, bool causal, float scale, int window_left=-1, "
      "int window_right=-1, float softcap=0.0, Tensor? alibi_slopes=None, float dropout_p=0.0, "
      "Tensor? dropout_seed_offset=None, int query_offset=-1, int key_offset=-1) -> "
      "(Tensor out, Tensor lse)");
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? grad_lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
      "int max_seqlen_k, bool causal, float scale, bool deterministic, int window_left=-1, "
      "int window_right=-1, float softcap=0.0, Tensor? alibi_slopes=None, float dropout_p=0.0, "
      "Tensor? dropout_seed_offset=None, int query_offset=-1, int key_offset=-1) -> "
      "(Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef BLOCK_ATTN_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_archs"] = std::string(BLOCK_ATTN_CUDA_ARCHS);
  info["torch_version"] = std::string(TORCH_VERSION);
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["cpu_threads"] = at::get_num_threads();
  info["cpu_capabilities"] = block_attn::cpu::compiled_capabilities();
  info["cpu_capability"] = std::string(block_attn::cpu::selected_kernels().capability);
  info["parallel_backend"] = at::get_parallel_info();
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "block_attn native extension: operators are registered under torch.ops.block_attn";
  module.def(
      "check_inputs",
      [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
        block_attn::check_attention_inputs(q, k, v);
        block_attn::check_scale(scale);
      },
      "The operators' checks of q, k, v and the scale, for code that computes without them.");
  module.def("build_info", &build_info,
             "What was compiled: CUDA kernels or not, CUDA archs, the torch version built against, "
             "OpenMP, and the number of CPU threads the kernels use.");
  module.def(
      "own_cpu_capability",
      [] { return std::string(block_attn::cpu::compiled_kernel_table().capability); },
      "The capability of the CPU kernels inside the extension itself: \"default\" in a portable "
      "build.");
  module.def("select_cpu_kernels", &block_attn::cpu::select_kernels, pybind11::arg("object_paths"),
             "Chooses the CPU kernels (see csrc/cpu/cpu_capability.h); returns the capability.");
#ifdef BLOCK_ATTN_WITH_CUDA
  block_attn::define_plan_functions(module);
#endif
}
