"""The implementations the benchmark compares, each behind one small interface.

A peer turns the shared (1, H, N, D) inputs into its own layout once, outside the timed
region (``prepare``), then computes attention from those tensors (``run``). ``run`` returns
the output in the peer's layout; the benchmark only times it and backpropagates through it.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Iterator
from typing import ClassVar

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

from bench.workloads import Workload


class UnsupportedError(Exception):
    """The peer does not handle this workload (recorded as n/a, not as a failure)."""


class Peer:
    """Base class: identity layout; subclasses set ``name`` and implement ``run``."""

    name = "peer"

    def __init__(self, workload: Workload, device: str):
        self.workload = workload
        self.device = device

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def settings(self) -> contextlib.AbstractContextManager:
        """What the timed step (forward, and backward where timed) runs under."""
        return contextlib.nullcontext()


class Ours(Peer):
    name = "block_attn"

    def __init__(self, workload, device, impl: Callable):
        super().__init__(workload, device)
        self.impl = impl
        self.kwargs = workload.ours_kwargs()

    def run(self, q, k, v):
        return self.impl(q, k, v, **self.kwargs)


class OursMmaSync(Ours):
    """block_attn with BLOCK_ATTN_HOPPER_KERNELS=0: the mma.sync kernels where the Hopper (wgmma)
    kernels would run, timed beside them in the same process."""

    name = "block_attn-mma"

    def __init__(self, workload, device, impl: Callable):
        from block_attn.cuda_kernels import hopper_kernels_apply

        dtype, head_dim = workload.dtype, workload.head_dim
        forward = hopper_kernels_apply(device, dtype, head_dim, max_seqlen_k=workload.max_len)
        if not forward and not hopper_kernels_apply(device, dtype, head_dim, backward=True):
            raise UnsupportedError("runs the same kernels as block_attn here")
        super().__init__(workload, device, impl)

    @contextlib.contextmanager
    def settings(self) -> Iterator[None]:
        previous = os.environ.get("BLOCK_ATTN_HOPPER_KERNELS")
        os.environ["BLOCK_ATTN_HOPPER_KERNELS"] = "0"
        try:
            yield
        finally:
            if previous is None:
                del os.environ["BLOCK_ATTN_HOPPER_KERNELS"]
            else:
                os.environ["BLOCK_ATTN_HOPPER_KERNELS"] = previous


class Reference(Ours):
    name = "reference"

    def __init__(self, workload, device, max_seqlen: int):
        if workload.seqlen > max_seqlen:
            raise UnsupportedError(f"O(N²) reference skipped above N = {max_seqlen}")
        import block_attn.reference

        super().__init__(workload, device, block_attn.reference.attention)


def document_ids(workload: Workload, device: str) -> torch.Tensor:
    """(N,) int32: the block each token belongs to."""
    lengths = torch.tensor(workload.lengths, device=device)
    ids = torch.arange(len(workload.lengths), device=device, dtype=torch.int32)
    return torch.repeat_interleave(ids, lengths)


def dense_mask(workload: Workload, device: str) -> torch.Tensor:
    """(1, 1, N, N) bool, True where a query may attend a key (256 MB at N = 16384)."""
    ids = document_ids(workload, device)
    mask = ids[:, None] == ids[None, :]
    if workload.causal:
        mask = mask.tril_()
    return mask[None, None]


class Sdpa(Peer):
    """``F.scaled_dot_product_attention`` restricted to one backend.

    Causal attention uses ``is_causal``; fixed blocks become a batch of (N/b, H, b, D)
    sequences; packed documents take a dense boolean mask.
    """

    backends: ClassVar[dict[str, SDPBackend]] = {
        "sdpa-flash": SDPBackend.FLASH_ATTENTION,
        "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    }

    def __init__(self, workload, device, name: str):
        super().__init__(workload, device)
        self.name = name
        self.backend = self.backends[name]
        self.mask = None
        if workload.kind == "fixed":
            if workload.seqlen % workload.block_size:
                raise UnsupportedError("N is not a multiple of the block size")
        elif workload.kind == "docs":
            if self.backend == SDPBackend.FLASH_ATTENTION:
                raise UnsupportedError("flash takes no attention mask")
            self.mask = dense_mask(workload, device)

    def prepare(self, x):
        if self.workload.kind != "fixed":
            return x
        _, heads, seqlen, dim = x.shape
        b = self.workload.block_size
        return x.view(heads, seqlen // b, b, dim).transpose(0, 1).contiguous()

    def run(self, q, k, v):
        with sdpa_kernel([self.backend]):
            if self.workload.kind == "causal":
                return sdpa(q, k, v, is_causal=True)
            if self.workload.kind == "docs":
                return sdpa(q, k, v, attn_mask=self.mask)
            return sdpa(q, k, v, is_causal=self.workload.causal)


class SdpaLoop(Peer):
    """One ``F.scaled_dot_product_attention`` (flash backend) call per document."""

    name = "sdpa-flash-loop"

    def __init__(self, workload, device):
        if workload.kind != "docs":
            raise UnsupportedError("only for packed documents")
        super().__init__(workload, device)
        self.spans = list(zip(workload.offsets[:-1], workload.offsets[1:], strict=True))
        self.backend = SDPBackend.FLASH_ATTENTION if device == "cuda" else SDPBackend.MATH

    def run(self, q, k, v):
        with sdpa_kernel([self.backend]):
            outs = [
                sdpa(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=self.workload.causal)
                for s, e in self.spans
            ]
        return torch.cat(outs, dim=2)


def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def document_mask(doc_ids: torch.Tensor, causal: bool):
    """attention-gym's document mask: same block, and (if causal) key not after query."""

    def same_document(b, h, q_idx, kv_idx):
        return doc_ids[q_idx] == doc_ids[kv_idx]

    def same_document_causal(b, h, q_idx, kv_idx):
        return (doc_ids[q_idx] == doc_ids[kv_idx]) & (q_idx >= kv_idx)

    return same_document_causal if causal else same_document


_compiled_flex = None


def compiled_flex_attention():
    """One ``torch.compile``d flex_attention shared by every workload (fewer compilations)."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


class Flex(Peer):
    """FlexAttention under ``torch.compile`` with a block mask from ``create_block_mask``.

    Fixed blocks use the document mask with every block a document, so they share its
    compiled kernels.
    """

    name = "flex"

    def __init__(self, workload, device):
        super().__init__(workload, device)
        from torch.nn.attention.flex_attention import create_block_mask

        if workload.kind == "causal":
            mask_mod = causal_mask
        else:
            mask_mod = document_mask(document_ids(workload, device), workload.causal)
        n = workload.seqlen
        self.block_mask = create_block_mask(mask_mod, None, None, n, n, device=device)
        self.flex = compiled_flex_attention()

    def run(self, q, k, v):
        return self.flex(q, k, v, block_mask=self.block_mask)


def varlen_function():
    """``torch.nn.attention.varlen.varlen_attn`` when this torch has it, else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


class Varlen(Peer):
    """``torch.nn.attention.varlen.varlen_attn`` on packed (N, H, D) tensors."""

    name = "varlen"

    def __init__(self, workload, device):
        super().__init__(workload, device)
        self.fn = varlen_function()
        if self.fn is None:
            raise UnsupportedError("absent: no torch.nn.attention.varlen.varlen_attn")
        self.cu_seqlens = torch.tensor(workload.offsets, dtype=torch.int32, device=device)
        self.max_len = workload.max_len
        params = inspect.signature(self.fn).parameters
        self.kwargs = {}
        if workload.causal:
            if "is_causal" in params:
                self.kwargs["is_causal"] = True
            elif "window_size" in params:
                self.kwargs["window_size"] = (-1, 0)
            else:
                raise UnsupportedError("this varlen_attn has neither is_causal nor window_size")

    def prepare(self, x):
        return x[0].transpose(0, 1).contiguous()

    def run(self, q, k, v):
        cu = self.cu_seqlens
        return self.fn(q, k, v, cu, cu, self.max_len, self.max_len, **self.kwargs)


PEER_NAMES = [
    "block_attn",
    "block_attn-mma",
    "sdpa-flash",
    "sdpa-cudnn",
    "sdpa-efficient",
    "flex",
    "varlen",
    "sdpa-flash-loop",
    "reference",
]


def make_peer(name: str, workload: Workload, device: str, ours_impl, reference_max_seqlen: int):
    """Builds peer ``name`` for ``workload``; raises UnsupportedError or any setup error."""
    if name == "block_attn":
        return Ours(workload, device, ours_impl)
    if name == "block_attn-mma":
        return OursMmaSync(workload, device, ours_impl)
    if name in Sdpa.backends:
        return Sdpa(workload, device, name)
    if name == "flex":
        return Flex(workload, device)
    if name == "varlen":
        return Varlen(workload, device)
    if name == "sdpa-flash-loop":
        return SdpaLoop(workload, device)
    if name == "reference":
        return Reference(workload, device, reference_max_seqlen)
    raise ValueError(f"unknown peer {name!r}; known: {PEER_NAMES}")
