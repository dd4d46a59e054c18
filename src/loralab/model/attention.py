"""Attention for packed rows: every sequence attends only to itself, causally.

A packed row [1, T] holds several sequences back to back. SDPA with a plain causal mask would
let a sequence see the ones before it, which changes its loss. This module registers an
attention function with transformers (`AttentionInterface`) that reads the row's boundaries
(`cu_seq_lens_q`, int32 [n+1]) from the forward kwargs and runs one of:

- varlen: torch.nn.attention.varlen.varlen_attn (Flash Attention over cumulative lengths; CUDA)
- flex:   flex_attention with a document mask (compiled; CUDA)
- sdpa:   SDPA with a block-diagonal causal mask: exact, any device, O(T^2) memory (the CPU path)
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

ATTENTION_NAME = "loralab_packed"
BACKENDS = ("varlen", "flex", "sdpa")
_state: dict[str, Any] = {"backend": "sdpa", "cache_key": None, "cache_value": None}


def varlen_available() -> bool:
    """torch's varlen attention exists and a CUDA device is there to run it."""
    if not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def pick_backend(choice: str, device: torch.device) -> str:
    """auto: varlen on CUDA when torch has it, else flex on CUDA, else the exact SDPA fallback."""
    if choice != "auto":
        return choice
    if device.type == "cuda" and varlen_available():
        return "varlen"
    if device.type == "cuda" and flex_available():
        return "flex"
    return "sdpa"


def register() -> None:
    """Make `loralab_packed` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, packed_attention)
    # No mask tensor is built: the boundaries travel as cu_seq_lens instead.
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def packed_attention_on(model: torch.nn.Module, backend: str) -> Iterator[None]:
    """Switch a loaded HF model to packed attention for the block, then switch it back."""
    register()
    config = model.config
    before = config._attn_implementation
    _state["backend"] = backend
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = before
        _state["cache_key"] = _state["cache_value"] = None


@torch.compiler.disable
def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: q/k/v [1, heads, T, d] -> ([1, T, heads, d], None)."""
    del attention_mask, dropout  # boundaries come from cu_seq_lens; Qwen2 has no attention dropout
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        raise ValueError("packed attention needs cu_seq_lens_q (use loralab's packed collation)")
    max_len = int(kwargs.get("max_length_q") or query.shape[2])
    backend = _state["backend"]
    if backend == "varlen":
        out = _varlen(query, key, value, cu, max_len, scaling)
    elif backend == "flex":
        out = _flex(query, key, value, cu, scaling)
    else:
        out = _sdpa_block_diagonal(query, key, value, cu, scaling)
    return out, None


def _varlen(q, k, v, cu, max_len, scaling) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    # [1, H, T, d] -> [T, H, d], the layout flash attention's varlen kernels take.
    q3, k3, v3 = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))
    options = _varlen_options()
    if "enable_gqa" not in options and k3.shape[1] != q3.shape[1]:
        k3, v3 = (_repeat_heads(t, q3.shape[1] // t.shape[1], dim=1) for t in (k3, v3))
    out = varlen_attn(q3, k3, v3, cu, cu, max_len, max_len, scale=scaling, **options)
    return out.unsqueeze(0)


@functools.cache
def _varlen_options() -> dict[str, Any]:
    # torch 2.9-2.11 take is_causal=True; later versions window_size=(-1, 0) and enable_gqa.
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    options: dict[str, Any] = {}
    if "window_size" in params:
        options["window_size"] = (-1, 0)
    else:
        options["is_causal"] = True
    if "enable_gqa" in params:
        options["enable_gqa"] = True
    return options


def _repeat_heads(t: torch.Tensor, times: int, dim: int) -> torch.Tensor:
    return t.repeat_interleave(times, dim=dim) if times > 1 else t


def document_ids(cu: torch.Tensor, total: int) -> torch.Tensor:
    """[T] index of the sequence each position belongs to."""
    lengths = (cu[1:] - cu[:-1]).long()
    ids = torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), lengths)
    if ids.numel() != total:
        raise ValueError(f"cu_seq_lens covers {ids.numel()} tokens, the row has {total}")
    return ids


def block_diagonal_causal_mask(cu: torch.Tensor, total: int) -> torch.Tensor:
    """[T, T] bool: True where query i may attend key j (same sequence, j <= i)."""
    doc = document_ids(cu, total)
    pos = torch.arange(total, device=cu.device)
    return (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])


def _cached(kind: str, cu: torch.Tensor, build) -> Any:
    # The layers of one forward share the row's boundaries (the same cu tensor object): build
    # the mask once per batch. Holding `cu` keeps its memory from being reused by another batch.
    key = _state["cache_key"]
    if key is None or key[0] != kind or key[1] is not cu:
        _state["cache_value"] = build()
        _state["cache_key"] = (kind, cu)
    return _state["cache_value"]


def _sdpa_block_diagonal(q, k, v, cu, scaling) -> torch.Tensor:
    total = q.shape[2]
    mask = _cached("sdpa", cu, lambda: block_diagonal_causal_mask(cu, total))
    if k.shape[1] != q.shape[1]:
        k, v = (_repeat_heads(t, q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2)


def _flex(q, k, v, cu, scaling) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask

    total = q.shape[2]

    def build():
        doc = document_ids(cu, total)

        def document_causal(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

        return create_block_mask(document_causal, None, None, total, total, device=q.device)

    block_mask = _cached("flex", cu, build)
    gqa = k.shape[1] != q.shape[1]
    out = _compiled_flex()(q, k, v, block_mask=block_mask, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # flex_attention is only fast compiled; dynamic=True: one kernel for every row length.
    return torch.compile(flex_attention, dynamic=True)
