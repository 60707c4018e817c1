// The Hopper kernels' table: for each head_dim they are built for, their tile shape and which
// problems they take. The dispatch (launch.cu), the kernels' launchers and the generated
// instantiations (generate_instantiations.py reads the head-dim lists below) all read it here.
#pragma once

#include <type_traits>

namespace block_attn::cuda::hopper {

// Head dims with Hopper kernels, exact (no padding: the tiles hold whole 64-column blocks).
template <int... kHeadDims>
struct HeadDims {
  static constexpr bool contains(int head_dim) { return ((head_dim == kHeadDims) || ...); }

  // f(std::integral_constant<int, head_dim>{}) where head_dim is in the list, else `otherwise`.
  template <typename Result, typename F>
  static Result dispatch(int head_dim, Result otherwise, F&& f) {
    Result result = otherwise;
    ((head_dim == kHeadDims ? (result = f(std::integral_constant<int, kHeadDims>{}), true)
                            : false) ||
     ...);
    return result;
  }
};

using ForwardHeadDims = HeadDims<128, 256>;
using BackwardHeadDims = HeadDims<64, 128>;

// Forward: kWarpgroups warpgroups of 64 queries share each K and V tile of kBlockN keys (64, or
// 128 with 64 x 128 score products). kOverlapSoftmax: each tile's softmax runs while the tensor
// cores form the previous tile's P V (K and V double-buffered); otherwise they take turns. It runs
// over key blocks longer than kMinKeys only (the mma.sync forward is as fast over shorter ones).
template <int kHeadDim>
struct ForwardShape;

// The fastest shape measured at head_dim 128 (wgmma_attention_probe), and faster than the
// mma.sync forward only over long key blocks.
template <>
struct ForwardShape<128> {
  static constexpr int kWarpgroups = 2;
  static constexpr int kBlockN = 128;
  static constexpr bool kOverlapSoftmax = true;
  static constexpr int kMinKeys = 4096;
};

// Double buffers of K and V would leave shared memory for one warpgroup per SM: the products and
// the softmax take turns.
template <>
struct ForwardShape<256> {
  static constexpr int kWarpgroups = 1;
  static constexpr int kBlockN = 64;
  static constexpr bool kOverlapSoftmax = false;
  static constexpr int kMinKeys = 0;
};

// Whether the Hopper forward's shapes take head_dim over key blocks of up to max_seqlen_k keys.
inline bool forward_takes(int head_dim, int max_seqlen_k) {
  return ForwardHeadDims::dispatch(head_dim, false, [&](auto dim) {
    return max_seqlen_k > ForwardShape<decltype(dim)::value>::kMinKeys;
  });
}

// Backward: kWarpgroups warpgroups of 64 keys per dK/dV CTA (two measured faster than one).
template <int kHeadDim>
struct BackwardShape {
  static_assert(BackwardHeadDims::contains(kHeadDim), "no Hopper backward at this head_dim");
  static constexpr int kWarpgroups = 2;
};

}  // namespace block_attn::cuda::hopper
