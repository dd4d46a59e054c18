"""Mixed steps (chunked prefill, as vLLM and SGLang do it): one forward holds every decoding
row's next token and chunks of the prompts still to prefill.

Alone, a prefill is compute-bound and a decode step memory-bound (it reads every weight for one
token per row), and while a prefill runs no row decodes. In a mixed step the decode tokens ride
along the prompt tokens' GEMMs: the step's tokens are flattened to [N, hidden] for the linear
layers (each token with its row's adapter columns, continuous_lora.masked_layer), each token's
K/V goes to its row's cache slot, and attention is two SDPA calls per layer:

- decode tokens over their rows' valid slots, every row of the cache at once as the decode
  step does (a view of the cache, no copy; the other rows' outputs are dropped);
- chunk tokens, padded to the longest chunk, over their row's slots up to their own (earlier
  chunks' K/V and causally within the chunk): a mask [chunks, 1, width, longest row].

A chunked row's prompt starts at slot 0 (no left padding), so its position is its slot. A long
prompt is spread over several steps, `budget` prompt tokens a step at most (rows in the order
they began); the step that feeds a row's last prompt token gives its first token from its
logits, and the row decodes from the next step. Mixed steps run eagerly (no CUDA graph).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loralab.engine.continuous_lora import masked_layer, one_adapter, row_masks
from loralab.engine.continuous_sampling import choose
from loralab.engine.fast_forward import rotate
from loralab.engine.kv_cache import additive_mask

if TYPE_CHECKING:
    from loralab.engine.continuous import ContinuousBatch


@dataclass
class Chunk:
    """The prompt tokens one prefilling row feeds in this step, from cache slot `start`."""

    row: int
    start: int
    tokens: list[int]
    last: bool  # the row's prompt ends with this chunk: it gets its first token now


@dataclass
class Plan:
    """One mixed step: the flat token list is the decode tokens (one per decoding row, in
    `decode` order), then each chunk's tokens in `chunks` order."""

    decode: list[int]
    chunks: list[Chunk]


def plan_step(batch: ContinuousBatch, budget: int) -> Plan:
    """Every decoding row, and chunks of the prefilling rows (first begun first) up to
    `budget` prompt tokens (at least one token, so a step always moves a prompt on)."""
    decode = sorted(row for row, r in batch.rows.items() if not r.pending)
    chunks, left = [], max(budget, 1)
    for row in batch.prefilling():
        if left <= 0:
            break
        r = batch.rows[row]
        take = r.pending[:left]
        chunks.append(Chunk(row, r.next_slot, take, len(take) == len(r.pending)))
        left -= len(take)
    return Plan(decode, chunks)


def mixed_step(batch: ContinuousBatch, budget: int) -> dict[int, int]:
    """Run one mixed step (inside inference_mode): {row: token} for every decoding row and
    every row whose prompt this step finishes."""
    import torch

    plan = plan_step(batch, budget)
    if plan.decode and max(batch.rows[r].next_slot for r in plan.decode) + 1 > batch.max_len:
        raise RuntimeError("a row ran past the cache: free it before its room runs out")
    layout = _Layout(batch, plan)
    x = _forward(batch, layout)
    picked = torch.cat([layout.decode_tokens, layout.last_tokens])
    logits = batch._head(x[picked]).float()
    rows = plan.decode + [c.row for c in plan.chunks if c.last]
    tokens = choose(logits, [batch.rows[r].sampling for r in rows],
                    [batch.rows[r].generator for r in rows])
    _advance(batch, plan, layout, rows, tokens, logits)
    return dict(zip(rows, batch._to_host(tokens), strict=True))


class _Layout:
    """The step's index tensors, built once on the host (no device sync inside the layers)."""

    def __init__(self, batch: ContinuousBatch, plan: Plan) -> None:
        import torch

        dev, n_decode = batch.device, len(plan.decode)
        longest = max(len(c.tokens) for c in plan.chunks)
        self.n_decode, self.n_chunks, self.width = n_decode, len(plan.chunks), longest
        self.decode_rows = _longs(plan.decode, dev)
        self.chunk_rows = _longs([c.row for c in plan.chunks], dev)
        ids, slots, rows, adapters = [], [], [], [batch.rows[r].adapter for r in plan.decode]
        gather, scatter, last = [], [], []  # flat <-> [chunks, width] padded layout
        for j, c in enumerate(plan.chunks):
            first = n_decode + len(ids)
            ids += c.tokens
            slots += range(c.start, c.start + len(c.tokens))
            rows += [c.row] * len(c.tokens)
            adapters += [batch.rows[c.row].adapter] * len(c.tokens)
            # a pad repeats the chunk's last token: finite, and its output is dropped
            gather += [first + min(t, len(c.tokens) - 1) for t in range(longest)]
            scatter += [j * longest + t for t in range(len(c.tokens))]
            if c.last:
                last.append(first + len(c.tokens) - 1)
        self.adapters = adapters
        self.decode_tokens = torch.arange(n_decode, device=dev)
        self.last_tokens = _longs(last, dev)
        self.gather = _longs(gather, dev)
        self.scatter = _longs(scatter, dev)
        chunk_ids = _longs(ids, dev)
        chunk_slots = _longs(slots, dev)
        # decode tokens' inputs are the batch's own device tensors (the last step's choice)
        self.ids = torch.cat([batch.token[self.decode_rows], chunk_ids])
        self.positions = torch.cat([batch.position[self.decode_rows], chunk_slots])
        self.slots = torch.cat([batch.slot[self.decode_rows], chunk_slots])
        self.rows = torch.cat([self.decode_rows, _longs(rows, dev)])
        self.decode_length = 1 + max((batch.rows[r].next_slot for r in plan.decode), default=0)
        self.chunk_length = max(c.start + len(c.tokens) for c in plan.chunks)
        self.chunk_mask = _chunk_mask(plan.chunks, longest, self.chunk_length, batch)

    def decode_mask(self, batch: ContinuousBatch) -> Any:
        """[rows, 1, 1, length]: each decoding row's valid slots (this step's included); the
        other rows attend slot 0 alone, only to stay finite."""
        import torch

        allowed = torch.zeros(batch.max_rows, self.decode_length, dtype=torch.bool,
                              device=batch.device)
        allowed[:, 0] = True
        allowed[self.decode_rows] = batch.valid[self.decode_rows, : self.decode_length]
        return additive_mask(allowed[:, None, None], batch.dtype)


def _longs(values: list[int], device: Any) -> Any:
    """An int64 tensor on `device` (an empty list too: it indexes)."""
    import torch

    return torch.tensor(values, dtype=torch.long, device=device)


def _chunk_mask(chunks: list[Chunk], width: int, length: int, batch: ContinuousBatch) -> Any:
    """[chunks, 1, width, length]: a chunk token at slot p attends slots 0..p of its row (its
    prompt starts at slot 0, so every earlier slot is its own); a pad as the chunk's last."""
    import torch

    dev = batch.device
    start = torch.tensor([c.start for c in chunks], device=dev)[:, None]
    count = torch.tensor([len(c.tokens) for c in chunks], device=dev)[:, None]
    offset = torch.minimum(torch.arange(width, device=dev)[None], count - 1)
    query_slot = start + offset  # [chunks, width]
    allowed = torch.arange(length, device=dev)[None, None] <= query_slot[:, :, None]
    return additive_mask(allowed[:, None], batch.dtype)


def _forward(batch: ContinuousBatch, layout: _Layout) -> Any:
    """The step's tokens through every layer, their K/V written to the cache: x [N, hidden]."""
    import torch

    s, n = batch.shape, len(layout.ids)
    batch.valid[layout.rows, layout.slots] = True  # this step's slots, for this and later steps
    decode_mask = layout.decode_mask(batch) if layout.n_decode else None
    model = batch.lm.model
    x = model.embed_tokens(layout.ids)
    cos, sin = model.rotary_emb(x[:, None], layout.positions[:, None])  # [N, 1, dim]
    lora, masks = _token_lora(batch, layout.adapters)
    for i, w in enumerate(batch.layers):
        def attend(q, k, v, i=i):
            q = rotate(q.view(n, s.heads, s.head_dim), cos, sin)
            k = rotate(k.view(n, s.kv_heads, s.head_dim), cos, sin)
            keys, values = batch.keys[i], batch.values[i]
            where = (layout.rows, layout.slots)
            keys.transpose(1, 2).index_put_(where, k.to(batch.dtype))
            values.transpose(1, 2).index_put_(where, v.view(n, s.kv_heads, s.head_dim)
                                              .to(batch.dtype))
            parts = []
            if layout.n_decode:
                parts.append(_attend_decode(batch, layout, q[: layout.n_decode], keys, values,
                                            decode_mask))
            parts.append(_attend_chunks(batch, layout, q, keys, values))
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        x = masked_layer(x, w, s, lora[i], masks, attend)
    return x


def _attend_decode(batch: ContinuousBatch, layout: _Layout, q: Any, keys: Any, values: Any,
                   mask: Any) -> Any:
    """The decode tokens' attention [decode, heads·dim]: every cache row at once (a view, as
    the decode step does), the decoding rows' outputs kept."""
    import torch.nn.functional as F  # noqa: N812

    s, length = batch.shape, layout.decode_length
    full = q.new_zeros(batch.max_rows, s.heads, 1, s.head_dim)
    full[layout.decode_rows] = q[:, :, None]
    out = F.scaled_dot_product_attention(full, keys[:, :, :length], values[:, :, :length],
                                         attn_mask=mask, scale=s.scaling, enable_gqa=True)
    return out[layout.decode_rows].reshape(layout.n_decode, s.heads * s.head_dim)


def _attend_chunks(batch: ContinuousBatch, layout: _Layout, q: Any, keys: Any,
                   values: Any) -> Any:
    """The chunk tokens' attention [chunk tokens, heads·dim], chunks padded to one width."""
    import torch.nn.functional as F  # noqa: N812

    s, chunks, width = batch.shape, layout.n_chunks, layout.width
    length = layout.chunk_length
    qc = q[layout.gather].view(chunks, width, s.heads, s.head_dim).transpose(1, 2)
    kc = keys[layout.chunk_rows, :, :length]
    vc = values[layout.chunk_rows, :, :length]
    out = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=layout.chunk_mask,
                                         scale=s.scaling, enable_gqa=True)
    return out.transpose(1, 2).reshape(chunks * width, -1)[layout.scatter]


def _token_lora(batch: ContinuousBatch, adapters: list[int]) -> tuple[list[dict], dict]:
    """(per layer factors, masks [N, C]) for the step's tokens: one adapter's columns and no
    masks when every token shares it, else the whole stack with each token's row's mask."""
    import torch

    if len(set(adapters)) == 1:
        return one_adapter(batch.stack, batch.columns, adapters[0]), {}
    ids = torch.tensor(adapters, device=batch.device)
    return batch.stack, row_masks(batch.owners, ids, batch.dtype)


def _advance(batch: ContinuousBatch, plan: Plan, layout: _Layout, rows: list[int],
             tokens: Any, logits: Any) -> None:
    """The batch after the step: picked rows hold their next input token and logits; decode
    rows move one slot on; rows whose prompt ended become decoding rows at its end."""

    picked = _longs(rows, batch.device)
    batch.token[picked] = tokens
    batch.logits[picked] = logits
    if plan.decode:
        batch.slot[layout.decode_rows] += 1
        batch.position[layout.decode_rows] += 1
    for row in plan.decode:
        batch.rows[row].next_slot += 1
    for c in plan.chunks:
        r = batch.rows[c.row]
        r.pending = r.pending[len(c.tokens):]
        r.next_slot += len(c.tokens)
        if c.last:
            batch.position[c.row] = r.next_slot
            batch.slot[c.row] = r.next_slot
            batch.active[c.row] = 1
