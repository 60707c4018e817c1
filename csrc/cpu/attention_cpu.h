// CPU kernels: fused, tiled FlashAttention-style forward and backward over block-diagonal /
// causal masks. Instantiated for float, double, c10::BFloat16 and c10::Half.
#pragma once

#include "../attention_params.h"

namespace block_attn::cpu {

// Writes params.out and params.lse.
template <typename scalar_t>
void run_forward(const ForwardParams& params);

// Writes params.grad_q, grad_k and grad_v (fully overwritten, never accumulated into).
template <typename scalar_t>
void run_backward(const BackwardParams& params);

}  // namespace block_attn::cpu
