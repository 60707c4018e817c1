"""Hugging Face transformers attention backend: ``attn_implementation="block_attn"``.

``register()`` adds two functions to transformers under the name ``"block_attn"``:

- an attention-mask function, which turns the 2-D padding mask (and, with a static cache, the
  cache's unwritten rows) into block offsets once per forward pass, on the device, instead of a
  dense 4-D mask;
- the attention function, which views the batch as one packed row and calls
  :func:`block_attn.attention` with those offsets, or with the packed documents' offsets
  (``cu_seq_lens_q/k`` from ``DataCollatorWithFlattening``, or ``position_ids`` that restart).

Importing ``block_attn`` does not import this module or transformers.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import torch

from block_attn.api import attention

__all__ = [
    "MIN_TRANSFORMERS_VERSION",
    "NAME",
    "attention_forward",
    "padding_blocks_mask",
    "register",
]

NAME = "block_attn"
MIN_TRANSFORMERS_VERSION = "4.56.2"


def _check_transformers() -> None:
    """Raises ImportError when transformers is missing or older than the oldest release tested."""
    install = f'pip install "transformers>={MIN_TRANSFORMERS_VERSION}"'
    try:
        installed = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            f"block_attn.transformers needs transformers >= {MIN_TRANSFORMERS_VERSION}, which is "
            f"not installed: {install} (or pip install block_attn[transformers])"
        ) from None
    from packaging.version import Version

    if Version(installed) < Version(MIN_TRANSFORMERS_VERSION):
        raise ImportError(
            f"block_attn.transformers needs transformers >= {MIN_TRANSFORMERS_VERSION}, "
            f"found {installed}: {install}"
        )


def register() -> str:
    """Registers block_attn with transformers' attention and attention-mask interfaces.

    Afterwards ``attn_implementation="block_attn"`` works in ``from_pretrained``, ``from_config``
    and ``model.set_attn_implementation``. Calling it again is harmless.

    Returns:
        The implementation's name, ``"block_attn"``.

    Raises:
        ImportError: transformers is missing or older than ``MIN_TRANSFORMERS_VERSION``.
    """
    _check_transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, padding_blocks_mask)
    return NAME


def _first_and_end(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Start and end of each row's one run of True, computed on the device.

    Args:
        valid: (B, L) bool.

    Returns:
        start, end: (B,) int64, ``start == end`` for a row with no True.
    """
    count = valid.sum(dim=1)
    # argmax returns the first maximal index: the run's start (0 for an empty row).
    start = valid.to(torch.int32).argmax(dim=1)
    runs = valid[:, 0].to(torch.int64) + (valid[:, 1:] & ~valid[:, :-1]).sum(dim=1)
    # A row with a hole (valid, padding, valid) cannot be one block; checked without a host sync.
    torch._assert_async(
        (runs <= 1).all(),
        "block_attn needs each row's attention mask to be one run of ones (left or right padding)",
    )
    return start, start + count


def padding_blocks_mask(
    batch_size: int,
    q_length: int | None = None,
    kv_length: int = 0,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    use_vmap: bool = False,
    device: torch.device | str = "cpu",
    cache_position: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """transformers' attention-mask function for block_attn: block offsets, not a dense mask.

    Queries of row b are the positions ``q_offset + [0, q_length)``; keys are the positions
    ``kv_offset + [0, kv_length)``. A key is valid when the 2-D mask marks it and it is not after
    the last query (a static cache's unwritten rows); a query is valid when the mask marks it.
    Each row's valid queries and keys must be one run each (left or right padding), so that the
    causal mask, aligned bottom-right in each block, is the model's.

    Viewing q as one row of ``B * q_length`` tokens and k as ``B * kv_length``, row b gives five
    blocks: leading padding queries against no keys, no queries against leading padding keys,
    valid queries against valid keys, then the same for trailing padding. So no block is longer
    than ``q_length`` / ``kv_length`` and padding is never read.

    Args:
        batch_size: B.
        q_length: queries per row.
        kv_length: keys per row (a static cache's full size).
        q_offset: position of the first query (a 0-dim tensor for a static cache).
        kv_offset: position of the first key.
        mask_function: transformers' mask pattern; causal, bidirectional or packed are handled by
            the attention function, and overlays (``use_vmap``) are refused.
        attention_mask: (B, M) padding mask over positions ``[0, M)``, 1 or True = valid.
        use_vmap: True when the model overlays a custom mask function.
        device: where to make the offsets.
        cache_position: (Nq,) the queries' positions, which transformers before 5.0 passes
            instead of ``q_length`` and ``q_offset``.

    Returns:
        (1, 1, 2, 5B + 1) int32 offsets, the queries' then the keys', or None when there is no
        padding and no unwritten cache row (then the attention function needs no offsets).
    """
    if use_vmap:
        raise NotImplementedError(
            "block_attn does not support custom mask functions (or_mask_function / "
            "and_mask_function overlays) yet; use attn_implementation='sdpa' or 'eager' for "
            "this model"
        )
    if cache_position is not None:
        # transformers < 5.0: no cached keys before the queries exactly when they are as many.
        q_length = cache_position.shape[0]
        device = cache_position.device
        query_positions = cache_position
        queries_end = cache_position[-1] + 1
        if attention_mask is None and kv_offset == 0 and kv_length == q_length:
            return None
    else:
        queries_end = q_offset + q_length
        if (
            attention_mask is None
            and not isinstance(q_offset, torch.Tensor)
            and queries_end == kv_offset + kv_length
        ):
            return None
        device = torch.device(device)
        query_positions = torch.arange(q_length, device=device) + q_offset
    key_positions = torch.arange(kv_length, device=device) + kv_offset
    key_valid = (key_positions < queries_end).expand(batch_size, -1)
    query_valid = torch.ones(batch_size, q_length, dtype=torch.bool, device=device)
    if attention_mask is not None:
        mask = attention_mask.to(device=device, dtype=torch.bool)
        length = mask.shape[1]

        def marked(positions: torch.Tensor) -> torch.Tensor:
            # A static cache is longer than the mask: positions past it are invalid.
            index = positions.clamp(max=length - 1).expand(batch_size, -1)
            return mask.gather(1, index) & (positions < length)

        key_valid = key_valid & marked(key_positions)
        query_valid = marked(query_positions)
    q_start, q_end = _first_and_end(query_valid)
    k_start, k_end = _first_and_end(key_valid)
    rows = torch.arange(batch_size, device=device)
    q_base, k_base = rows * q_length, rows * kv_length
    q_start, q_end, q_next = q_base + q_start, q_base + q_end, q_base + q_length
    k_start, k_end, k_next = k_base + k_start, k_base + k_end, k_base + kv_length
    # Offsets after 0 for row b: leading padding, valid run, trailing padding (see docstring).
    offsets_q = torch.stack([q_start, q_start, q_end, q_next, q_next], dim=1)
    offsets_k = torch.stack([k_base, k_start, k_end, k_end, k_next], dim=1)
    offsets = torch.stack([offsets_q.flatten(), offsets_k.flatten()])
    # 4-D, as transformers passes a 4-D mask through unchanged (generate builds a static cache's
    # masks ahead and hands them back to the model).
    return torch.nn.functional.pad(offsets, (1, 0)).to(torch.int32).view(1, 1, 2, -1)


def _window_size(sliding_window: int | None, longest_keys: int) -> tuple[int, int]:
    """transformers' ``sliding_window`` (a query sees that many keys, itself included) as
    block_attn's ``window_size``, as transformers' flash-attention path converts it: causal,
    ``sliding_window - 1`` keys before the query (the right side is 0).

    A window at least as long as every key block masks nothing and is left out, so that such
    models keep to the plain kernels.
    """
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window}")
    if sliding_window is None or longest_keys <= sliding_window:
        return (-1, -1)
    return (sliding_window - 1, sliding_window - 1)


def _as_one_row(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) as (1, H, B * N, D): a view when x is a transposed (B, N, H, D) tensor."""
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(1, batch * length, heads, dim).transpose(1, 2)


def _document_offsets(position_ids: torch.Tensor) -> dict[str, Any]:
    """Offsets of the documents in one packed row: a document starts where a position is not
    the previous one plus 1 (transformers' rule for packed sequences)."""
    positions = position_ids.reshape(-1)
    length = positions.numel()
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[1:] = positions[1:] != positions[:-1] + 1
    index = torch.arange(length, dtype=torch.int32, device=positions.device)
    end = torch.full((1,), length, dtype=torch.int32, device=positions.device)
    if torch.compiler.is_compiling():
        # A fixed count of offsets (one per token, the unused ones empty blocks at the end) keeps
        # the shapes static, so the graph does not break.
        starts_first = torch.where(starts, index, length).sort().values
        return {"cu_seqlens": torch.cat([starts_first, end]), "max_seqlen": max(length, 1)}
    offsets = torch.cat([index[starts], end])
    return {"cu_seqlens": offsets, "max_seqlen": int(offsets.diff().max())}


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention function for block_attn; exact, like ``eager`` on valid tokens.

    Which blocks, in order of precedence:

    1. ``attention_mask`` from :func:`padding_blocks_mask` (padded batch, or static cache): each
       row's valid queries against its valid keys, causal aligned bottom-right.
    2. ``cu_seq_lens_q`` / ``cu_seq_lens_k`` with ``max_length_q`` / ``max_length_k`` (packed
       documents from ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``): the offsets
       stay on the device.
    3. ``position_ids`` of one row of as many queries as keys that restart: one block per document.
    4. Otherwise causal attention per batch row (bottom-right aligned for cached decoding).

    Args:
        module: the attention layer (its ``is_causal`` is read, default True).
        query: (B, Hq, Nq, D).
        key: (B, Hkv, Nk, D), ``Hq % Hkv == 0``.
        value: (B, Hkv, Nk, D).
        attention_mask: (1, 1, 2, 5B + 1) offsets from :func:`padding_blocks_mask`, or None.
        scaling: softmax scale; default 1/sqrt(D).
        dropout: attention dropout (transformers passes the config's ``attention_dropout`` in
            training, else 0), as ``dropout_p`` of :func:`block_attn.attention`.
        sliding_window: None, or the keys a query sees, itself included (Mistral, Qwen2 and
            Gemma's sliding layers), counted inside its block: ``window_size=(sliding_window - 1,
            sliding_window - 1)`` with the causal mask, as transformers' flash-attention path.
        softcap: None, or Gemma 2's ``attn_logit_softcapping``: scores s become
            ``softcap * tanh(s / softcap)``.
        s_aux: (Hq,) attention sinks (GPT-OSS), passed as ``sinks``.
        **kwargs: ``cu_seq_lens_q``, ``cu_seq_lens_k``, ``max_length_q``, ``max_length_k``,
            ``position_ids``, ``is_causal``; others are ignored.

    Returns:
        (B, Nq, Hq, D) output (padding queries give 0) and None (no attention weights).

    Raises:
        NotImplementedError: a dense 4-D mask (not supported yet).
    """
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    batch, _, length_q, _ = query.shape
    blocks: dict[str, Any] | None = None
    if attention_mask is not None:
        if attention_mask.dtype != torch.int32 or attention_mask.shape[:3] != (1, 1, 2):
            raise NotImplementedError(
                "block_attn takes the block offsets its own mask function makes from a 2-D "
                f"padding mask, got a {tuple(attention_mask.shape)} {attention_mask.dtype} mask "
                "(dense custom masks are not supported); pass a 2-D attention_mask to the model"
            )
        blocks = {
            "cu_seqlens": attention_mask[0, 0, 0],
            "cu_seqlens_k": attention_mask[0, 0, 1],
            "max_seqlen": length_q,
            "max_seqlen_k": key.shape[2],
        }
    elif kwargs.get("cu_seq_lens_q") is not None and kwargs.get("cu_seq_lens_k") is not None:
        blocks = {
            "cu_seqlens": kwargs["cu_seq_lens_q"],
            "cu_seqlens_k": kwargs["cu_seq_lens_k"],
            "max_seqlen": int(kwargs["max_length_q"]),
            "max_seqlen_k": int(kwargs["max_length_k"]),
        }
    elif (
        kwargs.get("position_ids") is not None
        and batch == 1
        and length_q == key.shape[2]
        and length_q > 1
    ):
        blocks = _document_offsets(kwargs["position_ids"])
    # Documents from position_ids have as many keys as queries.
    longest_keys = (
        key.shape[2] if blocks is None else blocks.get("max_seqlen_k", blocks["max_seqlen"])
    )
    variants = {
        "window_size": _window_size(sliding_window, longest_keys),
        "softcap": 0.0 if softcap is None else softcap,
        "sinks": s_aux,
        "dropout_p": dropout,
    }
    if blocks is None:
        out = attention(query, key, value, causal=causal, scale=scaling, **variants)
        return out.transpose(1, 2), None
    out = attention(
        _as_one_row(query),
        _as_one_row(key),
        _as_one_row(value),
        causal=causal,
        scale=scaling,
        **variants,
        **blocks,
    )
    return out.transpose(1, 2).reshape(batch, length_q, out.shape[1], out.shape[3]), None
