"""The loaded adapters' LoRA factors stacked along the rank, for rows of different adapters in
one decode step or one prefill (S-LoRA / Punica style, without their kernels).

Per layer and projection group (fast_forward.GROUPS: qkv, o, gate_up, down) the adapters'
factors are concatenated, A [C, in] and B [out, C] with the scale folded into B, and a per-row
column mask keeps each row's own adapter's columns: y = x·Wᵀ + ((x·Aᵀ) ⊙ mask_row)·Bᵀ. The
extra work grows with the total rank of the loaded adapters, not with their number of rows.
"""

from __future__ import annotations

from typing import Any

from loralab.engine.fast_forward import GROUPS, Layer, Shape, rms
from loralab.engine.lora_batch import fill_adapter

FUSED = ("qkv", "gate_up")  # groups whose shrink rides in the base GEMM (fuse_shrinks)
FUSED_ROWS = 128  # a fused weight's rows are a multiple of this


def _ranks(loras: dict[int, dict[str, Any]]) -> dict[int, int]:
    """Each adapter's column width per group member: its largest rank (members pad to it)."""
    return {k: max((a.shape[0] for a, _, _ in lora.values()), default=1)
            for k, lora in loras.items()}


def stack_loras(lm: Any, loras: dict[int, dict[str, Any]], dtype: Any, device: Any
                ) -> tuple[list[dict[str, Any]], dict[int, Any], dict[int, dict[int, slice]]]:
    """The loaded adapters' factors concatenated along the rank, per layer and GROUPS group.

    `loras`: adapter id (≥1) -> {module name: (A [r, in], B [out, r], scale)}. Returns
    (per layer {group: (A [C, in], B [out, C]) or None}, {members: owner id per column [C]},
    {id: {members: the adapter's column slice}}). Columns are laid out per adapter (by id),
    then per member linear, the adapter's rank each; a member an adapter does not train is
    zero, which adds exact zeros."""
    import torch

    ids = sorted(loras)
    ranks = _ranks(loras)
    owners, columns = {}, {k: {} for k in ids}
    for members in {len(names) for _, _, names in GROUPS}:
        owner, start = [], 0
        for k in ids:
            width = members * ranks[k]
            owner += [k] * width
            columns[k][members] = slice(start, start + width)
            start += width
        owners[members] = torch.tensor(owner, dtype=torch.long, device=device)
    layers = []
    for i, layer in enumerate(lm.model.layers):
        entry = {}
        for group, owner_name, names in GROUPS:
            parent = getattr(layer, owner_name)
            keys = [f"model.layers.{i}.{owner_name}.{n}" for n in names]
            if not any(key in loras[k] for k in ids for key in keys):
                entry[group] = None
                continue
            linears = [getattr(parent, n) for n in names]
            linears = [getattr(m, "base_layer", m) for m in linears]
            outs = [m.out_features for m in linears]
            width = len(owners[len(names)])
            a_all = torch.zeros(width, linears[0].in_features, dtype=dtype, device=device)
            b_all = torch.zeros(sum(outs), width, dtype=dtype, device=device)
            for k in ids:
                fill_adapter(a_all, b_all, loras[k], keys, outs,
                             columns[k][len(names)].start, ranks[k])
            entry[group] = (a_all, b_all)
        layers.append(entry)
    return layers, owners, columns


def stacked_bytes(lm: Any, loras: list[dict[str, Any]], itemsize: int) -> int:
    """Bytes stack_loras allocates for `loras` (same layout, nothing allocated): a group of a
    layer that any adapter trains holds every adapter's columns, members × its rank each,
    zero or not."""
    ranks = _ranks(dict(enumerate(loras)))
    total = 0
    for i, layer in enumerate(lm.model.layers):
        for _, owner_name, names in GROUPS:
            keys = [f"model.layers.{i}.{owner_name}.{n}" for n in names]
            if not any(key in lora for lora in loras for key in keys):
                continue
            linears = [getattr(getattr(layer, owner_name), n) for n in names]
            linears = [getattr(m, "base_layer", m) for m in linears]
            width = sum(len(names) * r for r in ranks.values())
            total += width * (linears[0].in_features + sum(m.out_features for m in linears))
    return total * itemsize


def one_adapter(stack: list[dict[str, Any]], columns: dict[int, dict[int, slice]],
                adapter: int) -> list[dict[str, Any]]:
    """Per layer {group: (A, B)} of one adapter's columns (views); {} per layer for the base."""
    out: list[dict[str, Any]] = [{} for _ in stack]
    if not adapter:
        return out
    cols = columns[adapter]
    for mine, layer in zip(out, stack, strict=True):
        for group, _, names in GROUPS:
            ab = layer.get(group)
            if ab is not None:
                mine[group] = (ab[0][cols[len(names)]], ab[1][:, cols[len(names)]])
    return out


def row_masks(owners: dict[int, Any], adapters: Any, dtype: Any) -> dict[int, Any]:
    """{members: [rows, C] mask}: 1 on the columns of each row's adapter (`adapters` [rows],
    0 the base: no column)."""
    return {m: (owner[None] == adapters[:, None]).to(dtype) for m, owner in owners.items()}


def masked_linear(x: Any, weight: Any, bias: Any, lora: Any, mask: Any,
                  residual: Any = None) -> Any:
    """residual + x·Wᵀ + b plus the rows' own adapters: lora (A [C, in], B [out, C]), or
    (A, B, fused, fused bias) where fuse_shrinks put A under W; mask [.., C] (broadcast over
    x's leading dimensions).

    The sums ride in the matrix products' epilogues (addmm with beta 1: the GEMM reads the
    term it adds), instead of a GEMM and then an elementwise add over [tokens, out] per term:
    on an H200 7B mixed step of 320 tokens those adds were ~224 kernels and ~0.9 ms of 14.3.
    One rounding per GEMM instead of one per add."""
    import torch

    shape, out = x.shape, weight.shape[0]
    x2 = x.reshape(-1, shape[-1])
    if lora is not None and len(lora) == 4:  # x·Aᵀ comes out of the base GEMM (fuse_shrinks)
        a, b, fused, fused_bias = lora
        both = x2 @ fused.T if fused_bias is None else torch.addmm(fused_bias, x2, fused.T)
        y, h = both[:, :out], both[:, out:out + a.shape[0]]
    else:
        base = bias if residual is None else residual.reshape(-1, out)
        if residual is not None and bias is not None:
            base = base + bias
        y = x2 @ weight.T if base is None else torch.addmm(base, x2, weight.T)
        if lora is None:
            return y.view(*shape[:-1], out)
        a, b = lora
        h = x2 @ a.T
    if mask is not None:
        h = (h.reshape(*shape[:-1], -1) * mask).reshape(-1, h.shape[-1])
    y = y.addmm_(h, b.T)
    return y.view(*shape[:-1], out)


def fuse_shrinks(layers: list[Layer], stack: list[dict[str, Any]]) -> None:
    """Put each FUSED group's stacked A under the layer's weight, so that one GEMM gives
    x·Wᵀ and x·Aᵀ: the stack's entry becomes (A, B, fused, fused bias) and the layer's weight
    a view of the fused one's first rows (no second copy of the weight; the old fused tensor
    goes with the old stack). The extra rows are padded to a multiple of FUSED_ROWS, the GEMM
    tile's width. Saves the shrink GEMM (and its split-K reduction) of qkv and gate_up per
    layer: their input is the normed hidden state, whose GEMM is the base one; o and down add a
    residual in their GEMM and keep theirs."""

    for w, entry in zip(layers, stack, strict=True):
        for group in FUSED:
            lora = entry.get(group)
            if lora is None:
                continue
            a, b = lora[:2]
            weight, bias = getattr(w, group), getattr(w, f"{group}_bias")
            rows = -(-(weight.shape[0] + a.shape[0]) // FUSED_ROWS) * FUSED_ROWS
            fused = weight.new_zeros(rows, weight.shape[1])
            fused[:weight.shape[0]] = weight
            fused[weight.shape[0]:weight.shape[0] + a.shape[0]] = a
            fused_bias = None
            if bias is not None:
                fused_bias = bias.new_zeros(rows)
                fused_bias[:bias.shape[0]] = bias
                setattr(w, f"{group}_bias", fused_bias[:bias.shape[0]])
            setattr(w, group, fused[:weight.shape[0]])
            a = fused[weight.shape[0]:weight.shape[0] + a.shape[0]]  # one copy of A
            entry[group] = (a, b, fused, fused_bias)


def rope_tables(cos: Any, sin: Any) -> tuple[Any, Any]:
    """Token-major rotary tables [..., dim] -> (cos, sin with its first half negated), each
    [..., 1, 2, dim/2]: what masked_layer rotates q and k with, made once per step."""
    import torch

    half = cos.shape[-1] // 2
    shape = (*cos.shape[:-1], 1, 2, half)
    sin = sin.reshape(shape)  # device ops only: a step's body is captured as a CUDA graph
    return cos.reshape(shape), torch.cat((-sin[..., :1, :], sin[..., 1:, :]), dim=-2)


def rotate_qk(qk: Any, cos: Any, sin_signed: Any) -> Any:
    """q and k side by side [..., heads + kv_heads, 2, dim/2] rotated in 4 kernels, not 2 × 5:
    rotate_half(x) is x with its halves swapped (flip) and the first negated (in sin_signed),
    so every element is the product and sum fast_forward.rotate computes, bit for bit (no
    fused multiply-add: it would round differently). On an H200 7B mixed step rotary was ~10
    kernels a layer, ~1.4 ms of 13.8."""
    return qk * cos + qk.flip(-2) * sin_signed


def masked_layer(x: Any, w: Layer, s: Shape, lora: dict, masks: dict, attend: Any,
                 rope: tuple[Any, Any]) -> Any:
    """One decoder layer over x [..., hidden], each token with its row's adapter (`lora`: the
    layer's {group: (A, B)}, `masks`: {members: mask [.., C]}); `rope`: rope_tables of the
    tokens' positions. `attend(q, k, v)` does the attention part (q/k/v shaped [...,
    heads·dim], q and k rotated already) and returns [..., heads·dim]. The residual adds
    happen inside the o and down GEMMs (masked_linear)."""
    import torch.nn.functional as F  # noqa: N812

    def lin(h, group, members, residual=None):
        return masked_linear(h, getattr(w, group), getattr(w, f"{group}_bias"),
                             lora.get(group), masks.get(members), residual)

    q_size, kv_size = s.heads * s.head_dim, s.kv_heads * s.head_dim
    qkv = lin(rms(x, w.input_norm, s.eps), "qkv", 3)
    qk = qkv[..., :q_size + kv_size].unflatten(-1, (s.heads + s.kv_heads, 2, s.head_dim // 2))
    q, k = rotate_qk(qk, *rope).flatten(-3).split((q_size, kv_size), -1)
    x = lin(attend(q, k, qkv[..., q_size + kv_size:]), "o", 1, residual=x)
    gate, up = lin(rms(x, w.post_norm, s.eps), "gate_up", 2).chunk(2, dim=-1)
    return lin(F.silu(gate) * up, "down", 1, residual=x)
