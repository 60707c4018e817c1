"""Multi-head attention module built on :func:`block_attn.attention`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

import block_attn
from block_attn.blocks import resolve_blocks
from block_attn.validation import as_bool, as_float, as_int
from block_attn.variants import resolve_variants

__all__ = ["MultiheadBlockAttention", "alibi_slopes"]


def alibi_slopes(num_heads: int) -> list[float]:
    """The ALiBi paper's per-head slopes (as in BLOOM), head 0 first.

    For n heads, a power of two, head h gets ``2 ** (-8 * (h + 1) / n)``: a geometric sequence
    from ``2 ** (-8 / n)`` down to ``2 ** -8``. Otherwise the closest lower power of two c gives
    the first c slopes, and the remaining ``n - c`` are every other slope of ``2c`` heads
    (``2 ** (-8 * (2j + 1) / (2c))``, j = 0, 1, ...), which interleave with the first c.

    Args:
        num_heads: n >= 1.

    Returns:
        n floats in (0, 1).
    """
    num_heads = as_int(num_heads, "num_heads")
    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    closest = 1 << (num_heads.bit_length() - 1)
    slopes = [2.0 ** (-8.0 * i / closest) for i in range(1, closest + 1)]
    extra = [2.0 ** (-8.0 * i / (2 * closest)) for i in range(1, 2 * closest + 1, 2)]
    return slopes + extra[: num_heads - closest]


class MultiheadBlockAttention(nn.Module):
    """Multi-head attention with block-diagonal and/or causal masks, batch first.

    A drop-in for ``torch.nn.MultiheadAttention(batch_first=True)`` where the mask is a block
    structure instead of a dense tensor: fixed blocks (``block_size``), variable-length blocks
    per call (``cu_seqlens``, e.g. documents packed into one row) and/or causal. Attention runs
    through :func:`block_attn.attention`, which never materialises the (Nq, Nk) score matrix.

    Separate ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` linear layers. With
    ``num_kv_heads < num_heads`` the key and value projections are smaller
    (``embed_dim // num_heads * num_kv_heads`` outputs) and groups of query heads share a
    key/value head (grouped-query attention; ``num_kv_heads=1`` is multi-query attention).

    ``dropout`` drops attention probabilities in training mode, as
    ``torch.nn.MultiheadAttention`` does, inside the kernels (the mask is drawn from the default
    generator of the inputs' device; see ``dropout_p`` of :func:`block_attn.attention`).

    ``window_size``, ``softcap`` and ``alibi`` are the score variants of
    :func:`block_attn.attention` (see :mod:`block_attn.variants`); on CUDA they run in the simple
    kernels for now, not the tensor-core ones.

    Args:
        embed_dim: width E of the inputs and the output; a multiple of ``num_heads``.
        num_heads: query heads H; each head has dimension ``embed_dim // num_heads``.
        num_kv_heads: key/value heads; ``num_heads`` must be a multiple of it. Default
            ``num_heads``.
        block_size: default block structure: tokens ``[i*b, (i+1)*b)`` form block i. A
            ``cu_seqlens`` passed to :meth:`forward` overrides it for that call.
        causal: each query attends only keys at or before its position (inside its block).
            When query and key lengths differ (and no blocks are used) the mask is aligned
            bottom-right: query i attends key j iff ``j <= i + Nk - Nq``.
        dropout: probability of dropping each attention probability in training mode (the kept
            ones are scaled by ``1 / (1 - dropout)``); in [0, 1).
        bias: add biases to the four projections.
        window_size: ``(left, right)`` sliding window inside each block, FlashAttention's
            convention: query i (aligned bottom-right to its key block, at ``i'``) attends key j
            iff ``i' - left <= j <= i' + right``; -1 leaves a side unbounded, and with
            ``causal`` the right side is 0.
        softcap: when > 0, each scaled score s becomes ``softcap * tanh(s / softcap)``
            (Gemma 2's logit soft-capping); 0 disables it.
        alibi: add ALiBi's fixed per-head linear bias ``-slope_h * |i' - j|`` to the (capped)
            scores, with the slopes of :func:`alibi_slopes` (buffer ``alibi_slopes`` of shape
            (num_heads,), float32, not saved in the state dict and not trained).
        sinks: learn a per-head attention sink (parameter ``sinks`` of shape (num_heads,),
            initialised to 0): each row's softmax normaliser gains ``exp(sinks[h])``, a virtual
            key whose value is zero (see :func:`block_attn.attention`).
        device: device of the parameters.
        dtype: dtype of the parameters.

    Attributes:
        max_weights_elements: the largest ``B * H * Nq * Nk`` for which
            ``forward(..., need_weights=True)`` builds the dense attention probabilities.
    """

    max_weights_elements: int = 2**26

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        block_size: int | None = None,
        causal: bool = False,
        dropout: float = 0.0,
        bias: bool = True,
        window_size: Sequence[int] = (-1, -1),
        softcap: float = 0.0,
        alibi: bool = False,
        sinks: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        embed_dim = as_int(embed_dim, "embed_dim")
        num_heads = as_int(num_heads, "num_heads")
        num_kv_heads = num_heads if num_kv_heads is None else as_int(num_kv_heads, "num_kv_heads")
        dropout = as_float(dropout, "dropout")
        if embed_dim <= 0 or num_heads <= 0 or num_kv_heads <= 0:
            raise ValueError(
                f"embed_dim, num_heads and num_kv_heads must be positive, got embed_dim = "
                f"{embed_dim}, num_heads = {num_heads}, num_kv_heads = {num_kv_heads}"
            )
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim must be divisible by num_heads, got embed_dim = {embed_dim}, "
                f"num_heads = {num_heads}"
            )
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_heads must be a multiple of num_kv_heads, got num_heads = {num_heads}, "
                f"num_kv_heads = {num_kv_heads}"
            )
        if block_size is not None:
            block_size = as_int(block_size, "block_size")
            if block_size <= 0:
                raise ValueError(f"block_size must be a positive int or None, got {block_size}")
        causal = as_bool(causal, "causal")
        bias = as_bool(bias, "bias")
        alibi = as_bool(alibi, "alibi")
        sinks = as_bool(sinks, "sinks")
        # The functions' own checks, on queries of this module's heads that hold no data.
        variants = resolve_variants(
            torch.empty(0, num_heads, 0, 0, device="meta"),
            causal=False,
            window_size=window_size,
            softcap=softcap,
        )
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.block_size = block_size
        self.causal = causal
        self.window_size = (variants.window_left, variants.window_right)
        self.softcap = variants.softcap
        kv_dim = self.head_dim * num_kv_heads
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.dropout = dropout
        self.sinks = nn.Parameter(torch.empty(num_heads, **factory)) if sinks else None
        slopes = None
        if alibi:
            slopes = torch.tensor(alibi_slopes(num_heads), dtype=torch.float32, device=device)
        self.register_buffer("alibi_slopes", slopes, persistent=False)
        self.reset_parameters()

    def _apply(
        self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
    ) -> MultiheadBlockAttention:
        super()._apply(fn, recurse)
        # The kernels take float32 slopes: .to(dtype), .half() or .to_empty() would cast or
        # clear them, so they are rebuilt, exact, wherever the buffer went.
        if self.alibi_slopes is not None:
            slopes = alibi_slopes(self.num_heads)
            device = self.alibi_slopes.device
            self.alibi_slopes = torch.tensor(slopes, dtype=torch.float32, device=device)
        return self

    def reset_parameters(self) -> None:
        """Xavier-uniform input projections and zero biases, as torch.nn.MultiheadAttention;
        zero sinks."""
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight)
        self.out_proj.reset_parameters()
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        if self.sinks is not None:
            nn.init.zeros_(self.sinks)

    def extra_repr(self) -> str:
        options = (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, block_size={self.block_size}, "
            f"causal={self.causal}, dropout={self.dropout}, sinks={self.sinks is not None}"
        )
        if self.window_size != (-1, -1):
            options += f", window_size={self.window_size}"
        if self.softcap > 0:
            options += f", softcap={self.softcap}"
        if self.alibi_slopes is not None:
            options += ", alibi=True"
        return options

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        *,
        cu_seqlens: torch.Tensor | Sequence[int] | None = None,
        max_seqlen: int | None = None,
        cu_seqlens_k: torch.Tensor | Sequence[int] | None = None,
        max_seqlen_k: int | None = None,
        need_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attends ``query`` to ``key``/``value``.

        Args:
            query: (B, Nq, E).
            key: (B, Nk, E); default ``query`` (self-attention).
            value: (B, Nk, E); default ``key``.
            cu_seqlens: block offsets ``0 = c0 <= c1 <= ... <= cm <= N`` shared by all batch rows
                (a list of ints or a 1-D int tensor); overrides ``block_size`` for this call.
                Blocks need Nq == Nk.
            max_seqlen: with ``cu_seqlens`` as a tensor on the inputs' device, at least the
                longest block's length; the offsets then stay on the device (no
                synchronisation; CUDA graphs can capture the call), as in
                :func:`block_attn.attention`.
            cu_seqlens_k, max_seqlen_k: the keys' block offsets when they differ from the
                queries' (cross-attention between packed sequences, or new tokens against
                cached keys), as in :func:`block_attn.attention`.
            need_weights: also return the attention probabilities (with the module's window,
                softcap, ALiBi and sinks). They are computed by a separate dense path that
                materialises (B, H, Nq, Nk) — O(N²) time and memory — and is refused above
                ``max_weights_elements`` elements. Meant for inspection and tests; the output
                itself never goes through it.

        Returns:
            out: (B, Nq, E).
            weights: (B, H, Nq, Nk) probabilities per head (not averaged over heads, before
                any dropout), only with ``need_weights=True``. Masked entries are 0; a query
                with no allowed key has an all-zero row and outputs 0.
        """
        key = query if key is None else key
        value = key if value is None else value
        self._check_inputs(query, key, value)
        need_weights = as_bool(need_weights, "need_weights")
        batch, len_q, _ = query.shape
        len_k = key.shape[1]
        # (B, N, H, D) views transposed to SDPA's (B, H, N, D): the kernels take them as they are.
        q = self.q_proj(query).view(batch, len_q, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).view(batch, len_k, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).view(batch, len_k, self.num_kv_heads, self.head_dim).transpose(1, 2)
        block_size = self.block_size if cu_seqlens is None else None
        weights = None
        if need_weights:
            weights = self._attention_weights(
                q, k, block_size, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k
            )
        out = block_attn.attention(
            q,
            k,
            v,
            block_size=block_size,
            cu_seqlens=cu_seqlens,
            causal=self.causal,
            max_seqlen=max_seqlen,
            cu_seqlens_k=cu_seqlens_k,
            max_seqlen_k=max_seqlen_k,
            window_size=self.window_size,
            softcap=self.softcap,
            alibi_slopes=self.alibi_slopes,
            sinks=self.sinks,
            dropout_p=self.dropout if self.training else 0.0,
        )
        out = out.transpose(1, 2).reshape(batch, len_q, self.embed_dim)
        out = self.out_proj(out)
        return out if weights is None else (out, weights)

    def _check_inputs(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        dtype, device = self.q_proj.weight.dtype, self.q_proj.weight.device
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.device != device:
                raise ValueError(f"{name} must be on the module's device {device}, got {t.device}")
            # Under autocast the projections take other floating dtypes themselves.
            autocast = t.is_floating_point() and torch.is_autocast_enabled(t.device.type)
            if t.dtype != dtype and not autocast:
                raise TypeError(f"{name} must have the module's dtype {dtype}, got {t.dtype}")
            if t.dim() != 3:
                raise ValueError(
                    f"{name} must be 3-D (batch, seqlen, embed_dim), got {t.dim()}-D shape "
                    f"{tuple(t.shape)}"
                )
            if t.shape[-1] != self.embed_dim:
                raise ValueError(
                    f"{name} must have embed_dim = {self.embed_dim} features in its last dim, "
                    f"got shape {tuple(t.shape)}"
                )
        if not query.shape[0] == key.shape[0] == value.shape[0]:
            raise ValueError(
                f"query, key and value must share the batch size, got {query.shape[0]}, "
                f"{key.shape[0]}, {value.shape[0]}"
            )
        if key.shape[1] != value.shape[1]:
            raise ValueError(
                f"key and value must have the same length, got {key.shape[1]} and {value.shape[1]}"
            )

    def _attention_weights(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        block_size: int | None,
        cu_seqlens: torch.Tensor | Sequence[int] | None,
        cu_seqlens_k: torch.Tensor | Sequence[int] | None,
        max_seqlen: int | None,
        max_seqlen_k: int | None,
    ) -> torch.Tensor:
        """Dense (B, H, Nq, Nk) probabilities for q (B, H, Nq, D) and k (B, Hkv, Nk, D)."""
        batch, heads, len_q, _ = q.shape
        len_k = k.shape[2]
        elements = batch * heads * len_q * len_k
        if elements > self.max_weights_elements:
            raise ValueError(
                f"need_weights=True materialises B*H*Nq*Nk = {batch}*{heads}*{len_q}*{len_k} = "
                f"{elements} elements, above max_weights_elements = {self.max_weights_elements}; "
                f"call with need_weights=False or raise the class attribute"
            )
        layout = resolve_blocks(
            len_q,
            len_k,
            q.device,
            block_size=block_size,
            cu_seqlens=cu_seqlens,
            cu_seqlens_k=cu_seqlens_k,
            max_seqlen=max_seqlen,
            max_seqlen_k=max_seqlen_k,
        ).on_host()
        in_block, behind = layout.positions(q.device, shape=(len_q, len_k))
        allowed = in_block & (behind >= 0) if self.causal else in_block
        left, right = self.window_size
        if left >= 0:
            allowed = allowed & (behind <= left)
        if right >= 0:
            allowed = allowed & (behind >= -right)
        bias = None
        if self.alibi_slopes is not None:
            bias = -self.alibi_slopes.double().view(1, -1, 1, 1) * behind.abs()
        probs, _ = block_attn.reference.probabilities(
            q,
            k,
            allowed,
            1 / math.sqrt(self.head_dim),
            softcap=self.softcap,
            bias=bias,
            sinks=self.sinks,
        )
        return probs
