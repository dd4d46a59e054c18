"""A step of the continuous batch in two halves, so that the host prepares step k+1 while the
GPU runs step k (async scheduling, as vLLM does it).

launch(batch, budget) plans the step on the host, moves the host's bookkeeping on (each row's
next slot, the prompt tokens still to feed), copies the step's inputs to the device, runs (on
CUDA: replays) the step, draws the sampling rows' tokens and enqueues the copy of every row's
token into a host buffer of the step's own. On CUDA all of that is queued on the stream and
launch returns without waiting for the GPU. collect(batch, pending) waits for that copy and
gives {row: token}. ContinuousBatch.step() is collect(launch()).

Two steps may be launched and not collected at once (the one being collected and the next):
the next step reads what the previous one left in the batch's device tensors (a greedy row's
token never leaves the device between steps; a sampling row's draw is queued before the next
step), and the host buffers come in pairs (continuous_host.py). A row freed, or freed and begun
again, between a launch and its collect was still in that step: its token there is its old
request's, for the caller to drop. free() and begin() write the device after that step on the
same stream, so they never race it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from loralab.engine.continuous_graphs import run_step
from loralab.engine.continuous_host import Ticket
from loralab.engine.continuous_lora import masked_layer, rope_tables, row_masks
from loralab.engine.continuous_mixed import attend_decode, decode_attention_mask, mixed_step
from loralab.engine.continuous_sampling import sample

if TYPE_CHECKING:
    from loralab.engine.continuous import ContinuousBatch


@dataclass
class Pending:
    """A launched step whose tokens are not read yet."""

    rows: list[int]  # the rows it gives a token: decoding ones, and those whose prompt it ends
    mixed: bool  # it fed prompt tokens (a mixed step), else a decode step
    prompt_tokens: int  # how many it fed
    ticket: Ticket | None = None  # where its tokens land; None: no busy row, nothing ran


def launch(batch: ContinuousBatch, budget: int) -> Pending:
    """Launch one step (a mixed step while any row is prefilling) without waiting for it."""
    import torch

    if not batch.rows:
        return Pending([], False, 0)
    mixed = bool(batch.prefilling())  # never the decode graph then: it writes into their slots
    with torch.inference_mode():
        if mixed:
            rows, fed = mixed_step(batch, budget)
        else:
            rows, fed = decode_step(batch), 0
        sample_rows(batch, rows)
        ticket = batch.token_ring.download(batch.token)
    return Pending(rows, mixed, fed, ticket)


def decode_step(batch: ContinuousBatch) -> list[int]:
    """Launch a decode step (inside inference_mode): every busy row one token on; its rows."""
    need = max(r.next_slot for r in batch.rows.values()) + 1
    bucket = batch._bucket(need)
    run_step(batch, ("decode", bucket), lambda: batch._decode(bucket))
    rows = sorted(batch.rows)
    for row in rows:
        batch.rows[row].next_slot += 1
    return rows


def collect(batch: ContinuousBatch, pending: Pending) -> dict[int, int]:
    """{row: token} of a launched step, once its tokens are on the host."""
    if pending.ticket is None:
        return {}
    tokens = batch.token_ring.read(pending.ticket)
    return {row: tokens[row] for row in pending.rows}


def sample_rows(batch: ContinuousBatch, rows: list[int]) -> None:
    """The step left every row's argmax in batch.token; the sampling rows among `rows` draw
    theirs from their logits into it here, outside any graph (queued, not waited for)."""
    for row in rows:
        r = batch.rows[row]
        if r.sampling.temperature > 0:
            batch.token[row] = sample(batch.logits[row], r.sampling, r.generator)


def decode(batch: ContinuousBatch, length: int) -> None:
    """The decode step's body, every cache row at once (what a graph captures); reads and writes
    only tensors the batch holds."""
    s, rows = batch.shape, batch.max_rows
    batch.valid.scatter_(1, batch.slot[:, None], True)
    mask = decode_attention_mask(batch, length)
    masks = row_masks(batch.owners, batch.row_adapter, batch.dtype)
    model = batch.lm.model
    x = model.embed_tokens(batch.token)
    cos, sin = model.rotary_emb(x[:, None], batch.position[:, None])  # [rows, 1, dim]
    rope = rope_tables(cos[:, 0], sin[:, 0])
    where = batch.slot[:, None, None, None].expand(rows, s.kv_heads, 1, s.head_dim)
    for i, w in enumerate(batch.layers):
        def attend(q, k, v, i=i):
            q = q.view(rows, s.heads, s.head_dim)
            k = k.view(rows, s.kv_heads, s.head_dim)
            batch.keys[i].scatter_(2, where, k[:, :, None].to(batch.dtype))
            batch.values[i].scatter_(2, where, v.view(rows, s.kv_heads, 1, s.head_dim))
            return attend_decode(batch, q, batch.keys[i], batch.values[i], mask, length)

        x = masked_layer(x, w, s, batch.stack[i], masks, attend, rope)
    batch.logits.copy_(batch._head(x))
    batch.token.copy_(batch.logits.argmax(-1))
    batch.slot.add_(batch.active)
    batch.position.add_(batch.active)
