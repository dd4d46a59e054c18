"""Continuous batching: rows join and leave a running decode batch, each with its own length,
position and adapter.

The static engine (decode.py) writes every row's keys at one shared cache offset, so a batch
is fixed from its first token to its last. A server needs the opposite: a request that arrives
while others decode joins at the next step, and a finished row leaves at once. Here the cache is
preallocated per layer as [max_rows, kv_heads, max_len, head_dim] and every row carries its own
next slot, position id and which slots it may attend (`valid`), all device tensors, so one
decode step is the same code whichever rows are busy (on CUDA it is replayed as a CUDA graph
per attention-length bucket, continuous_graphs.py; idle rows compute garbage nobody reads). One
more cache row than `max_rows`, the scratch row, takes the K/V of the mixed step's slots that
hold no real token; no real token attends it.

Several adapters share each step (S-LoRA / Punica style, without their kernels): their
factors are stacked along the rank (continuous_lora.py) and each row keeps its own adapter's
columns with a mask; a row of the base model has an all-zero mask. A prefill mixes adapters
the same way; one whose rows all share an adapter takes just that adapter's columns.

Sampling (greedy, or temperature / top_p with a per-request seed; continuous_sampling.py) runs
on the logits after the step, outside the graph.

A row joins either prefilled whole (add: left-padded prompts in one forward) or prefilling
(begin: its prompt from slot 0, fed in chunks by the next steps). While any row is prefilling,
step() is a mixed step (continuous_mixed.py): the decoding rows' tokens and chunks of the
prompts in one forward of fixed shapes (a graph per bucket on CUDA too), so decode rides along
the prefill's weight reads.

A step is launched and collected in two calls (launch() -> Pending, collect(pending) -> tokens;
continuous_step.py), so a server can launch the next step before it reads this one's tokens and
the GPU never waits for the host in between; step() does both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loralab.engine import continuous_step
from loralab.engine.continuous_graphs import drop_graphs
from loralab.engine.continuous_host import HostRing
from loralab.engine.continuous_lora import (
    fuse_shrinks,
    masked_layer,
    one_adapter,
    rope_tables,
    row_masks,
    stack_loras,
)
from loralab.engine.continuous_sampling import Sampling, choose, generator, sample
from loralab.engine.continuous_step import Pending
from loralab.engine.fast_forward import build_layers, model_shape, rms, why_not
from loralab.engine.kv_cache import additive_mask
from loralab.errors import UserError

__all__ = ["ContinuousBatch", "Pending", "Sampling", "cache_bytes", "sample"]

MIN_BUCKET = 128  # the shortest attention length a decode graph is captured for
PREFILL_CHUNK = 320  # prompt tokens a mixed step feeds at most, unless step() is told


@dataclass
class _Row:
    adapter: int  # 0: the base model
    sampling: Sampling
    generator: Any  # torch.Generator of a sampling row, else None
    next_slot: int  # host copy of the row's next cache slot (picks the attention bucket)
    pending: list[int] = field(default_factory=list)  # prompt tokens still to feed (begin)


def cache_bytes(lm: Any, max_rows: int, max_len: int) -> int:
    """Bytes of the KV cache ContinuousBatch(lm, max_rows, max_len) allocates (keys and values
    of every layer, its scratch row included), plus its float32 logits: known before allocating
    any of it."""
    s = model_shape(lm)
    itemsize = lm.lm_head.weight.element_size()
    kv = 2 * len(lm.model.layers) * (max_rows + 1) * s.kv_heads * max_len * s.head_dim
    return kv * itemsize + max_rows * lm.config.vocab_size * 4


class ContinuousBatch:
    """A decode batch of up to `max_rows` rows over one base model and the loaded adapters.

    add(prompts, adapters, samplings) -> (rows, first tokens); begin(prompt, adapter, sampling)
    -> row (prefilling: its first token comes from a later step); step() -> {row: token} for
    every decoding row and every row whose prompt it finished, or launch() -> Pending and
    collect(pending) -> the same, in two calls; free(row). Not thread-safe: one thread drives
    it (the server's scheduler).
    """

    def __init__(self, lm: Any, max_rows: int = 64, max_len: int = 2048,
                 cuda_graph: bool = True) -> None:
        import torch

        reason = why_not(lm)
        if reason:
            raise UserError(f"the continuous engine cannot run this model ({reason}): "
                            "serve it with --engine naive")
        cfg = lm.config
        self.lm, self.max_rows, self.max_len = lm, max_rows, max_len
        weight = lm.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.shape = model_shape(lm)
        with torch.inference_mode():
            self.layers = build_layers(lm)
        # one row more: the scratch row (index max_rows), for the mixed step's unused slots
        kv = (max_rows + 1, self.shape.kv_heads, max_len, self.shape.head_dim)
        zeros = dict(dtype=self.dtype, device=self.device)
        self.keys = [torch.zeros(kv, **zeros) for _ in self.layers]
        self.values = [torch.zeros(kv, **zeros) for _ in self.layers]
        # per row: input token, its position id, the cache slot it goes to, busy or not, adapter
        self.token, self.position, self.slot, self.active, self.row_adapter = (
            torch.zeros(max_rows, dtype=torch.long, device=self.device) for _ in range(5))
        self.valid = torch.zeros(max_rows + 1, max_len, dtype=torch.bool, device=self.device)
        self.logits = torch.zeros(max_rows, cfg.vocab_size, dtype=torch.float32,
                                  device=self.device)
        self.rows: dict[int, _Row] = {}
        self.free_rows = list(range(max_rows))
        self.loras: dict[int, dict[str, Any]] = {}
        self.stack: list[dict[str, Any]] = [{} for _ in self.layers]
        self.owners: dict[int, Any] = {}
        self.columns: dict[int, dict[int, slice]] = {}
        self.use_graph = cuda_graph and self.device.type == "cuda"
        self.fuse_shrinks = True  # continuous_lora.fuse_shrinks at set_adapters
        # each launched step's tokens (and add()'s first tokens, read at once)
        self.token_ring = HostRing(max_rows, self.device)
        self.graphs: dict[tuple[str, int], dict[str, Any]] = {}  # (kind, bucket) -> graph
        self.mixed_inputs: Any = None  # continuous_mixed.StepInputs, made by the first one
        self.stats = {"graph_error": None, "captures": 0, "capture_seconds": 0.0}

    # ------------------------------------------------------------ adapters

    def set_adapters(self, loras: dict[int, dict[str, Any]]) -> None:
        """Replace the loaded adapters (id ≥ 1 -> {module: (A, B, scale)}). Busy rows keep
        their adapter id: the caller frees rows of an adapter it drops first."""
        import torch

        with torch.inference_mode():
            if loras:
                stack, self.owners, self.columns = stack_loras(self.lm, loras, self.dtype,
                                                               self.device)
                self.stack = [{} for _ in self.layers]  # the old fused weights can go
                if self.fuse_shrinks:
                    fuse_shrinks(self.layers, stack)
                self.stack = stack
            else:
                self.stack, self.owners, self.columns = [{} for _ in self.layers], {}, {}
        self.loras = dict(loras)
        drop_graphs(self)  # captured graphs (decode and mixed) point at the old factors

    def adapter_bytes(self) -> int:
        """Bytes the stacked factors take on the device."""
        return sum(t.nbytes for layer in self.stack for ab in layer.values() if ab
                   for t in ab[:2])

    # ------------------------------------------------------------ rows

    def add(self, prompts: list[list[int]], adapters: int | list[int] = 0,
            samplings: list[Sampling] | None = None) -> tuple[list[int], list[int]]:
        """Prefill `prompts` into free rows, each with its adapter (`adapters`: one id per
        prompt, or one id for all; 0 the base); (rows, first token of each)."""
        import torch

        if len(prompts) > len(self.free_rows):
            raise RuntimeError(f"{len(prompts)} rows asked, {len(self.free_rows)} free")
        if isinstance(adapters, int):
            adapters = [adapters] * len(prompts)
        if len(adapters) != len(prompts):
            raise ValueError(f"{len(adapters)} adapter ids for {len(prompts)} prompts")
        for adapter in adapters:
            if adapter and adapter not in self.loras:
                raise KeyError(f"adapter id {adapter} is not loaded")
        samplings = samplings or [Sampling() for _ in prompts]
        width = max(len(p) for p in prompts)
        if width >= self.max_len:
            raise ValueError(f"a prompt of {width} tokens does not fit {self.max_len} slots")
        rows = [self.free_rows.pop(0) for _ in prompts]
        with torch.inference_mode():
            try:
                logits = self._prefill(prompts, rows, adapters, width)
            except Exception:  # the rows were never busy: back to the free list
                self.free_rows[:0] = rows
                raise
            index = torch.tensor(rows, device=self.device)
            lengths = torch.tensor([len(p) for p in prompts], device=self.device)
            self.position[index] = lengths
            self.slot[index] = width
            self.active[index] = 1
            self.row_adapter[index] = torch.tensor(adapters, device=self.device)
            for row, adapter, sampling in zip(rows, adapters, samplings, strict=True):
                self.rows[row] = _Row(adapter, sampling, generator(sampling, self.device), width)
            self.logits[index] = logits.float()  # each row's last logits, as after a step
            tokens = choose(self.logits[index], [self.rows[row].sampling for row in rows],
                            [self.rows[row].generator for row in rows])
            self.token[index] = tokens
            firsts = self.token_ring.read(self.token_ring.download(tokens))
        return rows, firsts

    def begin(self, prompt: list[int], adapter: int = 0,
              sampling: Sampling | None = None) -> int:
        """Take a free row for `prompt` without running anything: the next steps feed it to
        the cache from slot 0, a chunk at a time, and the one that feeds its last token gives
        its first token. The row."""
        import torch

        if not self.free_rows:
            raise RuntimeError("1 row asked, 0 free")
        if adapter and adapter not in self.loras:
            raise KeyError(f"adapter id {adapter} is not loaded")
        if not 0 < len(prompt) < self.max_len:
            raise ValueError(f"a prompt of {len(prompt)} tokens does not fit "
                             f"{self.max_len} slots")
        sampling = sampling or Sampling()
        row = self.free_rows.pop(0)
        with torch.inference_mode():
            # fill_, not `t[row] = value`: setting one element from a Python value is a
            # blocking host-to-device copy on CUDA, which would wait for the step in flight
            self.valid[row].fill_(False)  # the slots of the row's last request
            self.active[row].fill_(0)  # the decode step leaves it alone until its prompt is in
            self.row_adapter[row].fill_(adapter)
        self.rows[row] = _Row(adapter, sampling, generator(sampling, self.device), 0,
                              list(prompt))
        return row

    def prefilling(self) -> list[int]:
        """Rows with prompt tokens still to feed, in the order they began."""
        return [row for row, r in self.rows.items() if r.pending]

    def pending_tokens(self) -> int:
        """Prompt tokens still to feed, all rows together."""
        return sum(len(r.pending) for r in self.rows.values())

    def free(self, row: int) -> None:
        """The row leaves the batch (decoding or still prefilling); the next add or begin
        reuses it."""
        import torch

        if self.rows.pop(row, None) is None:
            return
        with torch.inference_mode():
            for tensor in (self.active, self.slot, self.row_adapter):
                tensor[row].fill_(0)  # a kernel, not a blocking copy (see begin)
        self.free_rows.append(row)

    def busy(self) -> list[int]:
        return sorted(self.rows)

    def room(self, row: int) -> int:
        """Tokens the row can still take before its cache row is full."""
        return self.max_len - self.rows[row].next_slot

    # ------------------------------------------------------------ prefill

    def _prefill(self, prompts: list[list[int]], rows: list[int], adapters: list[int],
                 width: int):
        """Left-padded prompts written to cache slots [0, width) of `rows`, each row with its
        adapter; last logits."""
        import torch
        import torch.nn.functional as F  # noqa: N812

        n, dev, s = len(prompts), self.device, self.shape
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=dev)
        real = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                            device=dev, dtype=torch.bool)
        index = torch.tensor(rows, device=dev)
        self.valid[index] = False
        self.valid[index, :width] = real
        slots = torch.arange(width, device=dev)
        allowed = (slots[None] <= slots[:, None])[None] & real[:, None, :]
        allowed |= torch.eye(width, dtype=torch.bool, device=dev)[None]  # pads stay finite
        mask = additive_mask(allowed[:, None], self.dtype)
        positions = (real.long().cumsum(1) - 1).clamp(min=0)
        model = self.lm.model
        x = model.embed_tokens(ids)
        rope = rope_tables(*model.rotary_emb(x, positions))  # [n, width, 1, 2, dim/2]
        lora, masks = self._prefill_lora(adapters)
        for i, w in enumerate(self.layers):
            def attend(q, k, v, i=i):
                q = q.view(n, width, s.heads, s.head_dim).transpose(1, 2)
                k = k.view(n, width, s.kv_heads, s.head_dim).transpose(1, 2)
                v = v.view(n, width, s.kv_heads, s.head_dim).transpose(1, 2)
                self.keys[i][index, :, :width] = k.to(self.dtype)
                self.values[i][index, :, :width] = v.to(self.dtype)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=s.scaling,
                                                     enable_gqa=True)
                return out.transpose(1, 2).reshape(n, width, s.heads * s.head_dim)

            x = masked_layer(x, w, s, lora[i], masks, attend, rope)
        return self._head(x[:, -1])

    def _prefill_lora(self, adapters: list[int]) -> tuple[list[dict[str, Any]], dict]:
        """(per layer factors, masks) for a prefill: one adapter's columns and no masks when
        every row shares it, else the whole stack with each row's mask [n, 1, C] (broadcast
        over the prompt's tokens)."""
        import torch

        if len(set(adapters)) == 1:
            return one_adapter(self.stack, self.columns, adapters[0]), {}
        ids = torch.tensor(adapters, device=self.device)
        masks = row_masks(self.owners, ids, self.dtype)
        return self.stack, {m: mask[:, None] for m, mask in masks.items()}

    def _head(self, x: Any) -> Any:
        import torch.nn.functional as F  # noqa: N812

        norm = self.lm.model.norm
        return F.linear(rms(x, norm.weight, norm.variance_epsilon), self.lm.lm_head.weight,
                        self.lm.lm_head.bias)

    # ------------------------------------------------------------ decode

    def step(self, prefill_tokens: int = PREFILL_CHUNK) -> dict[int, int]:
        """One new token for every decoding row: {row: token}. While rows are prefilling, a
        mixed step that also feeds up to `prefill_tokens` of their prompts (continuous_mixed)
        and gives the first token of each row whose prompt it finishes."""
        return self.collect(self.launch(prefill_tokens))

    def launch(self, prefill_tokens: int = PREFILL_CHUNK) -> Pending:
        """step()'s first half: the step is planned, the rows' host state moved on, and the
        step queued on the device; its tokens are not waited for. At most two launched steps
        may be left uncollected (their host buffers come in pairs)."""
        return continuous_step.launch(self, prefill_tokens)

    def collect(self, pending: Pending) -> dict[int, int]:
        """step()'s second half: {row: token} of a launched step, once they are on the host. A
        row freed since the launch still has its token here (its old request's)."""
        return continuous_step.collect(self, pending)

    def _bucket(self, need: int) -> int:
        """The attention length for a step whose rows reach slot `need`: on CUDA a power of
        two (one graph each), on CPU `need` (eager: no reason to attend to more). A step past
        the cache is a RuntimeError (the caller frees rows before their room runs out)."""
        if need > self.max_len:
            raise RuntimeError("a row ran past the cache: free it before its room runs out")
        if not self.use_graph:
            return need
        bucket = MIN_BUCKET
        while bucket < need:
            bucket *= 2
        return min(bucket, self.max_len)

    def _decode(self, length: int) -> None:
        """The decode step's body (continuous_step.decode); a method, so tests can wrap it."""
        continuous_step.decode(self, length)
