"""The decode loops: loralab's static greedy loop over a preallocated KV cache, and
transformers' `generate` (sampling, attention kernels the static loop cannot drive).

The static loop's decode step touches no Python state that changes between tokens, so on CUDA
it is captured once per batch in a CUDA graph and replayed: one launch per token instead of
~1,000 kernel launches from Python, which is where HF `generate` spends most of a 7B decode
step. Prefill skips work every prompt shares: the common token prefix (system prompt and chat
template) is computed once and its keys/values copied into every row, and the suffixes are
prefilled in a few length-sorted row groups, each padded only to its own longest. Decode
attention for grouped-query models reads the cache without repeating K/V per query head.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

from loralab.engine.forward import core_model, decode_attention
from loralab.engine.kv_cache import StaticKV, additive_mask, left_pad
from loralab.engine.settings import GenSettings, GenStats

CHECK_EVERY = 8  # decode steps between checks whether every sequence has stopped (one sync)
MIN_SHARED_PREFIX = 4  # a shorter common prefix is not worth its own forward


def static_generate(model: Any, ids: list[list[int]], settings: GenSettings,
                    stop_ids: list[int], pad_id: int, forward: Any, stats: GenStats
                    ) -> list[list[int]]:
    """Greedy new token ids per row (always max_new_tokens of them unless all stopped); rows
    are `forward.copies` adapter-major blocks of `ids`. `forward`: forward.make_forward's,
    shared by the batches of one call; what the loop did goes into `stats`."""
    with decode_attention():
        return _static_generate(model, ids, settings, stop_ids, pad_id, forward, stats)


def common_prefix_length(ids: list[list[int]]) -> int:
    """Tokens every sequence starts with, leaving each at least one token of its own."""
    shortest = min(len(x) for x in ids)
    n = 0
    while n < shortest - 1 and all(x[n] == ids[0][n] for x in ids):
        n += 1
    return n


def row_groups(rows: int, groups: int) -> list[tuple[int, int]]:
    """[start, end) row ranges: `groups` near-equal contiguous pieces (fewer if rows are few)."""
    groups = max(1, min(groups, rows))
    cuts = [round(i * rows / groups) for i in range(groups + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def _static_generate(model, ids, settings, stop_ids, pad_id, forward, stats) -> list[list[int]]:
    import torch

    lm = core_model(model)
    device = next(lm.parameters()).device
    dtype = next(p.dtype for p in lm.parameters() if p.is_floating_point())
    shared = common_prefix_length(ids) if settings.shared_prefix else 0
    shared = shared if shared >= MIN_SHARED_PREFIX else 0
    stats.shared_prefix = max(stats.shared_prefix, shared)
    # Several adapters in one batch (FastForward.copies): every prompt once per adapter,
    # adapter-major, so adapter k owns rows [k·n, (k+1)·n).
    copies, n = forward.copies, len(ids)
    suffixes = [x[shared:] for x in ids] * copies
    batch, width = len(suffixes), max(len(x) for x in suffixes)
    steps = settings.max_new_tokens
    max_len = shared + width + steps
    cache = StaticKV(lm.config, batch, max_len, dtype, device)
    # Cache slots: [shared prefix | suffixes left-padded to `width` | new tokens].
    key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
    key_valid[:, :shared] = True
    lengths = torch.tensor([len(x) for x in suffixes], device=device)
    suffix_slots = torch.arange(width, device=device)
    key_valid[:, shared : shared + width] = suffix_slots[None] >= (width - lengths)[:, None]
    blocks = [(k, slice(k * n, (k + 1) * n)) for k in range(copies)]
    if shared:
        for k, rows in blocks:
            _prefill_prefix(forward, ids[0][:shared], cache, dtype, rows, k)
    logits = torch.cat([
        _prefill_rows(forward, suffixes, (rows.start + a, rows.start + b), shared, width,
                      key_valid, cache, dtype, pad_id, k)
        for k, rows in blocks for a, b in row_groups(n, settings.prefill_chunks)])
    cache.advance(shared + width)
    out = torch.full((batch, steps), pad_id, dtype=torch.long, device=device)
    token = logits.argmax(-1)
    out[:, 0] = token
    position = (shared + lengths)[:, None]
    state = _DecodeState(token[:, None].clone(), position, key_valid,
                         torch.ones((), dtype=torch.long, device=device), out)
    stop = torch.tensor(stop_ids, device=device)
    step_fn = _make_step(forward, cache, state, dtype)
    runner = _graph_runner(step_fn, device, settings, stats)
    force = settings.min_new_tokens >= steps
    for done in range(1, steps):
        runner()
        if not force and (done + 1) % CHECK_EVERY == 0 and _all_stopped(out[:, : done + 1], stop):
            break
    return out.tolist()


def _prefill_prefix(forward, prefix: list[int], cache: StaticKV, dtype, rows: slice,
                    adapter: int) -> None:
    """Run the shared prefix once (batch 1) and write its keys/values into all `rows`."""
    import torch

    device = cache.offset.device
    n = len(prefix)
    input_ids = torch.tensor([prefix], device=device)
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    positions = torch.arange(n, device=device)[None]
    forward.prefill(cache, input_ids, positions, additive_mask(causal[None, None], dtype),
                    (rows, 0), (slice(rows.start, rows.start + 1), n), adapter)


def _prefill_rows(forward, suffixes, rows: tuple[int, int], shared: int, width: int, key_valid,
                  cache: StaticKV, dtype, pad_id: int, adapter: int = 0):
    """Prefill rows [a, b) padded only to their own longest suffix; their last logits."""
    import torch

    a, b = rows
    device = key_valid.device
    group_ids, mask = left_pad(suffixes[a:b], pad_id, device)
    local = group_ids.shape[1]
    first = shared + width - local  # the group's first slot: right-aligned with the batch
    end = shared + width
    slots = torch.arange(end, device=device)
    query_slots = first + torch.arange(local, device=device)
    # Causal over slots, padding never attended; a pad row attends to itself so its (unused)
    # output stays finite and cannot poison the values the real tokens read.
    allowed = (slots[None] <= query_slots[:, None])[None] & key_valid[a:b, None, :end]
    allowed |= (slots[None] == query_slots[:, None])[None]
    positions = shared + (mask.cumsum(1) - 1).clamp(min=0)
    return forward.prefill(cache, group_ids, positions, additive_mask(allowed[:, None], dtype),
                           (slice(a, b), first), (slice(a, b), end), adapter)


@dataclass
class _DecodeState:
    token: Any  # [batch, 1] the last token, input of the next step
    position: Any  # [batch, 1] its position id
    key_valid: Any  # [batch, max_len] which cache slots may be attended
    written: Any  # () how many new tokens are in `out`
    out: Any  # [batch, max_new_tokens] generated ids


def _make_step(forward, cache: StaticKV, s: _DecodeState, dtype):
    """One greedy token for every row; reads and writes only tensors held by `s` and `cache`."""

    def step() -> None:
        s.key_valid.index_fill_(1, cache.offset.view(1), True)  # the slot this token fills
        mask = additive_mask(s.key_valid[:, None, None, :], dtype)
        logits = forward.decode(cache, s.token, s.position, mask)
        token = logits.argmax(-1)
        cache.advance(1)
        s.position.add_(1)
        s.token.copy_(token[:, None])
        s.out.index_copy_(1, s.written.view(1), token[:, None])
        s.written.add_(1)

    return step


def _graph_runner(step, device, settings: GenSettings, stats: GenStats):
    """`step` itself on CPU; on CUDA two eager warm-up steps, then a captured graph's replay."""
    import torch

    if device.type != "cuda" or not settings.cuda_graph:
        return step
    calls = {"n": 0, "graph": None}
    side = torch.cuda.Stream(device)

    def run() -> None:
        if calls["graph"] is not None:
            calls["graph"].replay()
            return
        calls["n"] += 1
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            step()  # warm-up steps are real steps: capture below records without running
        torch.cuda.current_stream(device).wait_stream(side)
        if calls["n"] == 2:
            graph = torch.cuda.CUDAGraph()
            started = time.perf_counter()
            try:
                # thread_local: the adapter prefetch thread may pin memory meanwhile
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    step()
            except Exception as exc:  # an op that cannot be captured: stay eager, say so once
                stats.graph_error = f"{type(exc).__name__}: {exc}"[:300]
                warnings.warn(f"CUDA graph capture failed, decoding eagerly: {exc}", stacklevel=2)
                calls["n"] = -(10**9)
                return
            calls["graph"] = graph
            stats.cuda_graph = True
            stats.capture_seconds = round(time.perf_counter() - started, 4)

    return run


def _all_stopped(out, stop) -> bool:
    import torch

    return bool(torch.isin(out, stop).any(dim=1).all())


def hf_generate(
    model: Any, ids: list[list[int]], settings: GenSettings, stop_ids: list[int], pad_id: int,
    streamer: Any = None,
) -> list[list[int]]:
    """New token ids per prompt through `model.generate` (explicit settings: no model defaults
    such as Qwen's repetition_penalty or sampling leak into a greedy evaluation). `streamer`:
    transformers' streamer for one prompt (chat); it keeps the default dynamic cache, whose
    first token comes sooner than a static cache's."""
    import torch

    device = next(model.parameters()).device
    input_ids, mask = left_pad(ids, pad_id, device)
    kwargs: dict[str, Any] = dict(
        max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens,
        do_sample=settings.do_sample, eos_token_id=stop_ids, pad_token_id=pad_id,
        repetition_penalty=1.0, use_cache=True,
    )
    if settings.do_sample:
        torch.manual_seed(settings.seed)
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if streamer is not None:
        kwargs["streamer"] = streamer
    elif device.type == "cuda":
        kwargs["cache_implementation"] = "static"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
    return [row.tolist() for row in out[:, input_ids.shape[1] :]]
