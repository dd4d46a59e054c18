"""Mixed steps (chunked prefill, as vLLM and SGLang do it): one forward holds every decoding
row's next token and chunks of the prompts still to prefill.

Alone, a prefill is compute-bound and a decode step memory-bound (it reads every weight for one
token per row), and while a prefill runs no row decodes. In a mixed step the decode tokens ride
along the prompt tokens' GEMMs. Its token layout is fixed, so on CUDA it is one graph per
attention-length bucket (continuous_graphs.py), like the decode step:

- `max_rows` decode slots, one per cache row, exactly the decode step's inputs (the batch's
  token/position/slot tensors); a row that is not decoding (idle, or prefilling) writes its K/V
  into the scratch cache row (index max_rows, never attended by a real token) and its output
  is dropped;
- `budget` prompt slots: the chunks' tokens, then padding that writes into the scratch row too.

Every token's K/V goes to its (row, slot) before attention. Decode tokens attend as in the
decode step (every cache row at once, masked by `valid`). Prompt tokens attend in *lanes*:
a lane is up to `width` consecutive tokens of one chunk, its row's keys gathered up to the
bucket length [lanes, kv_heads, L, head_dim] and a mask [lanes, 1, width, L] letting a token at
slot p see slots 0..p (its prompt starts at slot 0, so every earlier slot is its own, and this
step's slots are already written: causality within the chunk comes from the mask). Lanes cost
lanes × width × L attention and gather `lanes` cache rows, not one per prompt token.

All per-step inputs (prompt ids, rows, slots, adapters, lanes, which outputs to take) are
copied into one preallocated device buffer (StepInputs) before the step, through pinned host
twins used in turn (continuous_host.py: the next step's launch must not rewrite what this
step's copy has yet to read); the step's body (`forward`) reads only the batch's tensors and
never syncs with the host. Sampling runs after it, outside the graph. A long prompt is spread
over several steps, `budget` prompt tokens and MAX_CHUNKS prompts a step at most (rows in the
order they began); the step that feeds a row's last prompt token gives its first token, and
the row decodes from the next step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loralab.engine.continuous_graphs import drop_graphs, run_step
from loralab.engine.continuous_host import HostRing
from loralab.engine.continuous_lora import masked_layer, rope_tables, row_masks
from loralab.engine.kv_cache import additive_mask

if TYPE_CHECKING:
    from loralab.engine.continuous import ContinuousBatch

LANE_WIDTH = 64  # prompt tokens one attention lane holds at most
MAX_CHUNKS = 4  # prompts one mixed step feeds at most (each may leave one lane part-filled)


@dataclass
class Chunk:
    """The prompt tokens one prefilling row feeds in this step, from cache slot `start`."""

    row: int
    start: int
    tokens: list[int]
    last: bool  # the row's prompt ends with this chunk: it gets its first token now


@dataclass
class Plan:
    """One mixed step: the decoding rows (sorted) and the chunks, in prompt-slot order."""

    decode: list[int]
    chunks: list[Chunk]


def lane_shape(budget: int) -> tuple[int, int]:
    """(lanes, width) for `budget` prompt slots: enough lanes for any plan_step plan, since
    chunks of n_c ≤ width·k tokens need Σ ceil(n_c / width) ≤ ceil(budget / width) +
    MAX_CHUNKS - 1 lanes."""
    width = max(1, min(budget, LANE_WIDTH))
    return -(-budget // width) + MAX_CHUNKS - 1, width


def plan_step(batch: ContinuousBatch, budget: int) -> Plan:
    """Every decoding row, and chunks of the prefilling rows (first begun first) up to
    `budget` prompt tokens and MAX_CHUNKS chunks (at least one token, so a step always moves a
    prompt on)."""
    decode = sorted(row for row, r in batch.rows.items() if not r.pending)
    chunks, left = [], max(budget, 1)
    for row in batch.prefilling():
        if left <= 0 or len(chunks) == MAX_CHUNKS:
            break
        r = batch.rows[row]
        take = r.pending[:left]
        chunks.append(Chunk(row, r.next_slot, take, len(take) == len(r.pending)))
        left -= len(take)
    return Plan(decode, chunks)


def mixed_step(batch: ContinuousBatch, budget: int) -> tuple[list[int], int]:
    """Launch one mixed step (inside inference_mode) and move the host's bookkeeping on:
    (the rows it gives a token: every decoding row and every row whose prompt it finishes,
    the prompt tokens it feeds). Nothing here waits for the device (continuous_step.py)."""
    plan = plan_step(batch, budget)
    need = max([batch.rows[r].next_slot + 1 for r in plan.decode]
               + [c.start + len(c.tokens) for c in plan.chunks])
    length = batch._bucket(need)
    inputs = step_inputs(batch, max(budget, 1))
    inputs.load(batch, plan)
    run_step(batch, ("mixed", length), lambda: forward(batch, inputs, length))
    _advance(batch, plan)
    return (plan.decode + [c.row for c in plan.chunks if c.last],
            sum(len(c.tokens) for c in plan.chunks))


def step_inputs(batch: ContinuousBatch, budget: int) -> StepInputs:
    """The batch's mixed-step buffers for `budget` prompt slots; new ones (and no mixed graphs:
    they read the old) when the budget changed."""
    if batch.mixed_inputs is None or batch.mixed_inputs.budget != budget:
        drop_graphs(batch, "mixed")
        batch.mixed_inputs = StepInputs(batch, budget)
    return batch.mixed_inputs


class StepInputs:
    """A mixed step's inputs in one device int64 buffer, loaded by one copy from one of its
    pinned host twins (`twins`, taken in turn): per prompt slot `ids`, `row`, `slot`
    (= position), `adapter`, `out` (its output's index among the lanes' outputs); per cache
    row `pick` (the step token whose logits it takes) and `done` (its prompt length if this
    step finishes its prompt, else 0); per lane `lane_row`, `lane_start` (slot of its first
    token), `lane_first` (prompt slot of it)."""

    def __init__(self, batch: ContinuousBatch, budget: int) -> None:
        import torch

        rows, scratch = batch.max_rows, batch.max_rows
        self.budget, (self.lanes, self.width) = budget, lane_shape(budget)
        self.pads = {"ids": [0] * budget, "row": [scratch] * budget, "slot": [0] * budget,
                     "adapter": [0] * budget, "out": [0] * budget,
                     "pick": list(range(rows)), "done": [0] * rows,
                     "lane_row": [scratch] * self.lanes, "lane_start": [0] * self.lanes,
                     "lane_first": [0] * self.lanes}
        total = sum(map(len, self.pads.values()))
        self.twins = HostRing(total, batch.device)
        self.device = torch.zeros(total, dtype=torch.long, device=batch.device)
        start = 0
        for name, pad in self.pads.items():  # self.ids, self.row, ...: views of self.device
            setattr(self, name, self.device[start:start + len(pad)])
            start += len(pad)

    def load(self, batch: ContinuousBatch, plan: Plan) -> None:
        """Write the plan's inputs into the device buffer (asynchronously on CUDA: the twin
        it goes through is not written again before that copy is done)."""
        f = {name: list(pad) for name, pad in self.pads.items()}
        at, lane, width = 0, 0, self.width
        for c in plan.chunks:
            n = len(c.tokens)
            f["ids"][at:at + n] = c.tokens
            f["row"][at:at + n] = [c.row] * n
            f["slot"][at:at + n] = range(c.start, c.start + n)
            f["adapter"][at:at + n] = [batch.rows[c.row].adapter] * n
            for first in range(0, n, width):  # the chunk's lanes
                f["lane_row"][lane], f["lane_start"][lane] = c.row, c.start + first
                f["lane_first"][lane] = at + first
                count = min(width, n - first)
                f["out"][at + first:at + first + count] = range(lane * width,
                                                                lane * width + count)
                lane += 1
            if c.last:
                f["pick"][c.row] = batch.max_rows + at + n - 1
                f["done"][c.row] = c.start + n
            at += n
        self.twins.upload([v for values in f.values() for v in values], self.device)


def forward(batch: ContinuousBatch, inputs: StepInputs, length: int) -> None:
    """The mixed step's body (what a graph captures): every cache row's decode token and the
    `budget` prompt slots through every layer, K/V written, each row's picked logits and argmax
    left in batch.logits / batch.token, decoding and finishing rows moved on. Fixed shapes,
    reads only the batch's tensors, never syncs with the host."""
    import torch

    s, rows, dev = batch.shape, batch.max_rows, batch.device
    # a row that is not decoding writes its decode slot's K/V into the scratch row
    decode_rows = torch.where(batch.active > 0, torch.arange(rows, device=dev), rows)
    where = (torch.cat([decode_rows, inputs.row]), torch.cat([batch.slot, inputs.slot]))
    n = len(where[0])
    batch.valid.index_put_(where, torch.ones((), dtype=torch.bool, device=dev))
    decode_mask = decode_attention_mask(batch, length)
    lanes = _Lanes(batch, inputs, length)
    masks = row_masks(batch.owners, torch.cat([batch.row_adapter, inputs.adapter]), batch.dtype)
    model = batch.lm.model
    x = model.embed_tokens(torch.cat([batch.token, inputs.ids]))
    positions = torch.cat([batch.position, inputs.slot])
    cos, sin = model.rotary_emb(x[:, None], positions[:, None])  # [N, 1, dim]
    rope = rope_tables(cos[:, 0], sin[:, 0])
    for i, w in enumerate(batch.layers):
        def attend(q, k, v, i=i):
            q = q.view(n, s.heads, s.head_dim)
            k = k.view(n, s.kv_heads, s.head_dim)
            keys, values = batch.keys[i], batch.values[i]
            keys.transpose(1, 2).index_put_(where, k.to(batch.dtype))
            values.transpose(1, 2).index_put_(where, v.view(n, s.kv_heads, s.head_dim)
                                              .to(batch.dtype))
            decode = attend_decode(batch, q[:rows], keys, values, decode_mask, length)
            return torch.cat([decode, lanes.attend(q, keys, values)])

        x = masked_layer(x, w, s, batch.stack[i], masks, attend, rope)
    batch.logits.copy_(batch._head(x[inputs.pick]))
    batch.token.copy_(batch.logits.argmax(-1))
    _move_rows_on(batch, inputs)


def decode_attention_mask(batch: ContinuousBatch, length: int) -> Any:
    """[rows, 1, 1, length]: each cache row's valid slots (this step's included), additive."""
    return additive_mask(batch.valid[:batch.max_rows, None, None, :length], batch.dtype)


def attend_decode(batch: ContinuousBatch, q: Any, keys: Any, values: Any, mask: Any,
                  length: int) -> Any:
    """One query per cache row [rows, heads, dim] -> its attention [rows, heads·dim] over its
    row's slots: every cache row at once (a view of the cache, no copy). The decode step's
    attention, and the decode slots' of a mixed step."""
    import torch.nn.functional as F  # noqa: N812

    s, rows = batch.shape, batch.max_rows
    out = F.scaled_dot_product_attention(
        q[:, :, None], keys[:rows, :, :length], values[:rows, :, :length], attn_mask=mask,
        scale=s.scaling, enable_gqa=True)
    return out.reshape(rows, s.heads * s.head_dim)


class _Lanes:
    """The prompt slots' attention in lanes (see the module's docstring), its index and mask
    tensors built once per step on the device."""

    def __init__(self, batch: ContinuousBatch, inputs: StepInputs, length: int) -> None:
        import torch

        dev, width = batch.device, inputs.width
        self.batch, self.inputs, self.length = batch, inputs, length
        offset = torch.arange(width, device=dev)[None]
        # each lane position's step token (past the lane's own tokens: later ones, dropped)
        within = (inputs.lane_first[:, None] + offset).clamp(max=inputs.budget - 1)
        self.tokens = batch.max_rows + within.reshape(-1)
        query_slot = inputs.lane_start[:, None] + offset  # [lanes, width]
        allowed = torch.arange(length, device=dev)[None, None] <= query_slot[:, :, None]
        self.mask = additive_mask(allowed[:, None], batch.dtype)  # [lanes, 1, width, L]

    def attend(self, q: Any, keys: Any, values: Any) -> Any:
        """q [N, heads, dim] of every step token -> the prompt slots' outputs [budget,
        heads·dim]."""
        import torch.nn.functional as F  # noqa: N812

        s, inputs, length = self.batch.shape, self.inputs, self.length
        lanes, width = inputs.lanes, inputs.width
        ql = q[self.tokens].view(lanes, width, s.heads, s.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            ql, keys[inputs.lane_row, :, :length], values[inputs.lane_row, :, :length],
            attn_mask=self.mask, scale=s.scaling, enable_gqa=True)
        return out.transpose(1, 2).reshape(lanes * width, -1)[inputs.out]


def _move_rows_on(batch: ContinuousBatch, inputs: StepInputs) -> None:
    """On the device: decoding rows one slot on; rows whose prompt this step finished decode
    from its end."""
    import torch

    finishing = inputs.done > 0
    batch.slot.copy_(torch.where(finishing, inputs.done, batch.slot + batch.active))
    batch.position.copy_(torch.where(finishing, inputs.done, batch.position + batch.active))
    batch.active.bitwise_or_(finishing.long())


def _advance(batch: ContinuousBatch, plan: Plan) -> None:
    """The host's copy of the step: decoding rows one slot on, chunks off the pending
    prompts."""
    for row in plan.decode:
        batch.rows[row].next_slot += 1
    for c in plan.chunks:
        r = batch.rows[c.row]
        r.pending = r.pending[len(c.tokens):]
        r.next_slot += len(c.tokens)
