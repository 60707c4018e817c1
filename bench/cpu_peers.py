"""CPU peers: PyTorch's ways to compute the same block-diagonal / causal attention on CPU.

Each peer follows ``bench.peers.Peer``: ``prepare`` changes the layout of the shared
(1, H, N, D) inputs outside the timed region, ``run`` computes attention from them.
"""

from __future__ import annotations

import torch
from torch.nn.functional import scaled_dot_product_attention as sdpa

from bench.peers import (
    Flex,
    Ours,
    Peer,
    UnsupportedError,
    dense_mask,
)
from bench.timing import median_ms
from bench.workloads import Workload

DENSE_MASK_MAX_BYTES = 4 * 2**30


class SdpaBatch(Peer):
    """Fixed blocks as a batch: (N/b, H, b, D), the 4-D form that reaches the fused CPU kernel.

    The 3-D form (N/b·H, b, D) falls back to the math kernel; ``layout_check`` times both.
    """

    name = "sdpa-batch"

    def __init__(self, workload, device):
        if workload.kind != "fixed":
            raise UnsupportedError("only for fixed blocks")
        if workload.seqlen % workload.block_size:
            raise UnsupportedError("N is not a multiple of the block size")
        super().__init__(workload, device)

    def prepare(self, x):
        _, heads, seqlen, dim = x.shape
        b = self.workload.block_size
        return x.view(heads, seqlen // b, b, dim).transpose(0, 1).contiguous()

    def run(self, q, k, v):
        return sdpa(q, k, v, is_causal=self.workload.causal)


class SdpaCausal(Peer):
    """``F.scaled_dot_product_attention(is_causal=True)`` over the whole sequence."""

    name = "sdpa-causal"

    def __init__(self, workload, device):
        if workload.kind != "causal":
            raise UnsupportedError("only for causal full attention")
        super().__init__(workload, device)

    def run(self, q, k, v):
        return sdpa(q, k, v, is_causal=True)


def dense_mask_bytes(workload: Workload, mode: str) -> int:
    """Rough peak of SDPA with a dense mask: the bool mask, its float copy, and in
    forward+backward the math kernel's (H, N, N) scores, probabilities and their gradients."""
    n2 = workload.seqlen**2
    extra = 4 * workload.heads * n2 * 4 if mode == "fwdbwd" else 0
    return n2 + 4 * n2 + extra


class SdpaDenseMask(Peer):
    """SDPA over the whole sequence with a dense (N, N) boolean block-diagonal mask."""

    name = "sdpa-dense-mask"

    def __init__(self, workload, device):
        super().__init__(workload, device)
        need = dense_mask_bytes(workload, "fwd")
        if need > DENSE_MASK_MAX_BYTES:
            raise UnsupportedError(
                f"mask and scores would take ~{need / 2**30:.0f} GB (limit "
                f"{DENSE_MASK_MAX_BYTES / 2**30:.0f} GB)"
            )
        self.mask = dense_mask(workload, device)

    def run(self, q, k, v):
        return sdpa(q, k, v, attn_mask=self.mask)


class SdpaLoop(Peer):
    """A Python loop of one SDPA call per document (or block), outputs concatenated."""

    name = "sdpa-loop"

    def __init__(self, workload, device):
        if workload.kind == "causal":
            raise UnsupportedError("one block: same as sdpa-causal")
        super().__init__(workload, device)
        self.spans = list(zip(workload.offsets[:-1], workload.offsets[1:], strict=True))

    def run(self, q, k, v):
        causal = self.workload.causal
        outs = [
            sdpa(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=causal) for s, e in self.spans
        ]
        return torch.cat(outs, dim=2)


class SdpaNested(Peer):
    """SDPA on nested jagged tensors (B = documents, jagged N) in (B, H, j, D) form."""

    name = "sdpa-nested"

    def __init__(self, workload, device):
        if workload.kind == "causal":
            raise UnsupportedError("one block: same as sdpa-causal")
        super().__init__(workload, device)
        self.offsets = torch.tensor(workload.offsets, dtype=torch.int64, device=device)

    def prepare(self, x):
        values = x[0].transpose(0, 1).contiguous()  # (N, H, D)
        return torch.nested.nested_tensor_from_jagged(values, self.offsets).transpose(1, 2)

    def run(self, q, k, v):
        return sdpa(q, k, v, is_causal=self.workload.causal)


class ReferenceSmall(Ours):
    """``block_attn.reference.attention`` (dense, pure PyTorch) at small sizes only."""

    name = "reference"

    def __init__(self, workload, device, max_seqlen: int):
        if workload.seqlen > max_seqlen:
            raise UnsupportedError(f"dense reference skipped above N = {max_seqlen}")
        import block_attn.reference

        super().__init__(workload, device, block_attn.reference.attention)


CPU_PEERS = {
    "block_attn": None,
    "sdpa-batch": SdpaBatch,
    "sdpa-causal": SdpaCausal,
    "sdpa-dense-mask": SdpaDenseMask,
    "sdpa-loop": SdpaLoop,
    "sdpa-nested": SdpaNested,
    "flex": Flex,
    "reference": ReferenceSmall,
}


def make_cpu_peer(name: str, workload: Workload, ours_impl, reference_max_seqlen: int) -> Peer:
    """Builds CPU peer ``name``; raises UnsupportedError or any setup error."""
    if name == "block_attn":
        return Ours(workload, "cpu", ours_impl)
    if name == "reference":
        return ReferenceSmall(workload, "cpu", reference_max_seqlen)
    if name not in CPU_PEERS:
        raise ValueError(f"unknown peer {name!r}; known: {list(CPU_PEERS)}")
    return CPU_PEERS[name](workload, "cpu")


def layout_check(heads: int, seqlen: int, dim: int, block: int, reps: int) -> dict:
    """Median milliseconds of SDPA forward on fixed blocks in each batch layout (float32)."""
    q, k, v = (torch.randn(1, heads, seqlen, dim) for _ in range(3))
    nb = seqlen // block

    def batch_heads(x):  # (N/b, H, b, D), contiguous
        return x.view(heads, nb, block, dim).transpose(0, 1).contiguous()

    layouts = {
        "(N/b, H, b, D) contiguous": batch_heads,
        "(N/b, H, b, D) strided view": lambda x: x.view(heads, nb, block, dim).transpose(0, 1),
        "(H, N/b, b, D) view": lambda x: x.view(heads, nb, block, dim),
        "(H·N/b, 1, b, D) view": lambda x: x.view(heads * nb, 1, block, dim),
        "(H·N/b, b, D) 3-D": lambda x: x.view(heads * nb, block, dim),
    }
    out = {}
    with torch.no_grad():
        for label, layout in layouts.items():
            a, b, c = layout(q), layout(k), layout(v)
            out[label] = round(median_ms(lambda a=a, b=b, c=c: sdpa(a, b, c), reps), 3)
    return out
