"""Several adapters in one generation batch: their LoRA factors stacked per projection group.

Evaluating K adapters one after another reads every base weight K times per decode step; with
their rows in one batch (adapter-major: rows [k·N, (k+1)·N) belong to adapter k) the step reads
the base weights once and adds each block's low-rank update with two batched GEMMs. Prefill is
compute-bound and gains nothing from sharing, so it runs per adapter with the 2-D factors.

Per layer and projection group (fast_forward.GROUPS: q/k/v, o, gate/up, down) the factors are padded to the largest
rank (zero rows and columns add exact zeros) and laid out so one GEMM pair serves the group:
A [K, members·r, in] and a block-structured B [K, out, members·r] with the scale folded in.
"""

from __future__ import annotations

from typing import Any

from loralab.engine.lora_weights import LoraWeights


def stack_adapters(lm: Any, loras: list[LoraWeights], groups: tuple, plain_linear: Any
                   ) -> list[dict[str, Any]]:
    """Per layer {group: (A [K, m·r, in], B [K, out, m·r]) or None when no adapter has it}.
    `groups` and `plain_linear` are the forward's (fast_forward.GROUPS, .plain_linear): passed
    in, since the forward imports this module."""
    rank = max((lora.max_rank for lora in loras), default=1)
    return [{group: _group(lm, loras, i, owner, names, rank, plain_linear)
             for group, owner, names in groups} for i in range(len(lm.model.layers))]


def _group(lm: Any, loras: list[LoraWeights], index: int, owner: str,
           names: tuple[str, ...], rank: int, plain_linear: Any) -> tuple[Any, Any] | None:

    parent = getattr(lm.model.layers[index], owner)
    linears = [plain_linear(getattr(parent, n)) for n in names]
    keys = [f"model.layers.{index}.{owner}.{n}" for n in names]
    if not any(key in lora for lora in loras for key in keys):
        return None
    weight = linears[0].weight
    outs = [m.out_features for m in linears]
    a_all = weight.new_zeros(len(loras), rank * len(names), linears[0].in_features)
    b_all = weight.new_zeros(len(loras), sum(outs), rank * len(names))
    for k, lora in enumerate(loras):
        fill_adapter(a_all[k], b_all[k], lora, keys, outs, 0, rank)
    return a_all, b_all


def fill_adapter(a_dst: Any, b_dst: Any, lora: Any, keys: list[str], outs: list[int],
                 first: int, rank: int) -> None:
    """Write one adapter's factors for a projection group into stacked columns: member j's A
    rows and B columns start at `first + j·rank`, its B rows follow the members' outputs, the
    scale is folded into B in float32; members it does not train stay zero."""
    row = 0
    for j, (key, out) in enumerate(zip(keys, outs, strict=True)):
        if key in lora:
            a, b, scale = lora[key]
            c0 = first + j * rank
            a_dst[c0 : c0 + a.shape[0]] = a.to(a_dst.device, a_dst.dtype)
            b_dst[row : row + out, c0 : c0 + a.shape[0]] = (
                b.to(b_dst.device).float() * scale).to(b_dst.dtype)
        row += out


def one_adapter(stacks: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """Adapter k's 2-D factors (views), for a block of rows that all belong to it."""
    return [{g: None if ab is None else (ab[0][k], ab[1][k]) for g, ab in layer.items()}
            for layer in stacks]


def lora_delta(x: Any, factors: tuple[Any, Any] | None) -> Any:
    """The low-rank update of x for one group: 2-D factors apply to every row; 3-D factors to
    K equal adapter-major blocks of rows."""
    import torch

    if factors is None:
        return 0
    a, b = factors
    if a.dim() == 2:
        return (x @ a.T) @ b.T
    blocks = x.reshape(a.shape[0], -1, x.shape[-1])
    out = torch.bmm(torch.bmm(blocks, a.transpose(1, 2)), b.transpose(1, 2))
    return out.reshape(*x.shape[:-1], -1)
