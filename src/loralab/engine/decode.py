"""The static greedy engine: loralab's own decode loop over a preallocated KV cache.

Its decode step touches no Python state that changes between tokens, so on CUDA it is captured
once per batch in a CUDA graph and replayed: one launch per token instead of ~1,000 kernel
launches from Python, which is where HF `generate` spends most of a 7B decode step. Prefill skips
work every prompt shares: the common token prefix (system prompt and chat template) is computed
once and its keys/values copied into every row, and the suffixes are prefilled in a few
length-sorted row groups, each padded only to its own longest. Decode attention for
grouped-query models reads the cache without repeating K/V per query head.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

from loralab.engine.settings import GenSettings

CHECK_EVERY = 8  # decode steps between checks whether every sequence has stopped (one sync)
# What the last static run did (benchmarks and metrics.json report it).
LAST_RUN: dict[str, Any] = {"cuda_graph": False, "graph_error": None, "shared_prefix": 0,
                            "fast_forward": None}
MIN_SHARED_PREFIX = 4  # a shorter common prefix is not worth its own forward


def core_model(model: Any) -> Any:
    """The transformers model inside a PeftModel (LoRA layers live in its modules)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model




def left_pad(ids: list[list[int]], pad_id: int, device: Any):
    """(input ids, attention mask) of `ids` left-padded with `pad_id` to the longest."""
    import torch

    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    return input_ids, mask


def _cache_base():
    from transformers.cache_utils import Cache

    return Cache


class StaticKV(_cache_base()):
    """Preallocated keys/values of every layer, written at a device-side offset.

    The offset lives in a tensor so the decode step is the same code every token (graph-safe);
    it advances once per forward, after all layers wrote (`advance`).
    """

    is_compileable = True

    def __init__(self, config: Any, batch: int, max_len: int, dtype: Any, device: Any) -> None:
        import torch

        # Cache.__init__ differs across transformers versions; this class needs none of it.
        heads = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (batch, heads, max_len, head_dim)
        n = config.num_hidden_layers
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]
        self.offset = torch.zeros((), dtype=torch.long, device=device)
        self.steps = torch.arange(max_len, device=device)
        self.layers = []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        where = self.offset + self.steps[: key_states.shape[2]]
        self.keys[layer_idx].index_copy_(2, where, key_states.to(self.keys[layer_idx].dtype))
        self.values[layer_idx].index_copy_(2, where, value_states.to(self.values[layer_idx].dtype))
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions and masks are always given explicitly

    def advance(self, n: int) -> None:
        self.offset.add_(n)


def _additive(valid, dtype):
    """Boolean 'may attend' → additive mask (finite minimum: a fully masked row stays finite)."""
    import torch

    zero = torch.zeros((), dtype=dtype, device=valid.device)
    return torch.where(valid, zero, torch.finfo(dtype).min)


def _cache_kwarg(lm: Any) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); use what this version takes."""
    import inspect

    params = inspect.signature(lm.model.forward).parameters if hasattr(lm, "model") else {}
    return "cache" if "cache" in params else "past_key_values"


def _forward(lm: Any, input_ids, position_ids, mask, cache, cache_kwarg: str):
    # Models with per-layer-type masks (Qwen2's has_sliding_layers) take them as a mapping;
    # the others (Llama, Mistral) take a 4-D mask, which transformers uses as given.
    masks = {"full_attention": mask, "sliding_attention": mask} \
        if hasattr(getattr(lm, "model", None), "has_sliding_layers") else mask
    out = lm(input_ids=input_ids, position_ids=position_ids, attention_mask=masks,
             use_cache=True, logits_to_keep=1, **{cache_kwarg: cache})
    return out.logits[:, -1]


def grouped_decode_attention(module, query, key, value, attention_mask, dropout=0.0,
                             scaling=None, **kwargs):
    """One-token attention for grouped-query models without copying K/V per query head.

    transformers' SDPA path repeats every K/V head for its query heads whenever a mask is given
    (7× the cache of Qwen2.5-7B read and written per layer and token): the largest cost of a
    decode step once launches are gone. Longer queries (prefill) use the SDPA path.
    """
    import torch

    if query.shape[2] != 1:
        return _SDPA["forward"](module, query, key, value, attention_mask, dropout=dropout,
                                scaling=scaling, **kwargs)
    batch, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    scale = scaling if scaling is not None else dim ** -0.5
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * scale
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, :length].float()  # [batch, 1, 1, length]
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [batch, kv_heads, group, dim]
    return out.reshape(batch, 1, heads, dim), None


_SDPA: dict[str, Any] = {}


class _decode_attention:  # noqa: N801 - a context manager
    """Route transformers' 'sdpa' attention through grouped_decode_attention while inside."""

    def __enter__(self) -> None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self.table = ALL_ATTENTION_FUNCTIONS
        self.had_local = "sdpa" in getattr(self.table, "_local_mapping", {})
        self.previous = self.table["sdpa"]
        _SDPA["forward"] = self.previous
        self.table["sdpa"] = grouped_decode_attention

    def __exit__(self, *exc: Any) -> None:
        if self.had_local:
            self.table["sdpa"] = self.previous
        else:
            del self.table["sdpa"]


def static_generate(
    model: Any, ids: list[list[int]], settings: GenSettings, stop_ids: list[int], pad_id: int,
    forward: Any = None,
) -> list[list[int]]:
    """Greedy new token ids per prompt (always max_new_tokens of them unless all stopped).
    `forward`: from make_forward, shared by the batches of one call (built here if None)."""
    forward = forward or make_forward(model, settings)
    with _decode_attention():
        return _static_generate(model, ids, settings, stop_ids, pad_id, forward)


class HFForward:
    """prefill/decode through transformers' own forward (any model the engine accepts)."""

    copies = 1  # one adapter (or none) per row: several adapters per batch need FastForward

    def __init__(self, lm: Any, compile_decode: bool = False) -> None:
        import torch

        self.lm, self.kwarg = lm, _cache_kwarg(lm)
        self.step = torch.compile(_forward, dynamic=False) if compile_decode else _forward

    def prefill(self, cache: StaticKV, input_ids, positions, mask, write, read, adapter=0):
        writer = _PrefillWriter(cache, write, read)
        return _forward(self.lm, input_ids, positions, mask, writer, self.kwarg)

    def decode(self, cache: StaticKV, token, position, mask):
        return self.step(self.lm, token, position, mask, cache, self.kwarg)


def make_forward(model: Any, settings: GenSettings,
                 lora: dict[str, Any] | list[dict[str, Any]] | None = None):
    """loralab's FastForward (with `lora` folded in, or a list of adapters sharing the batch)
    where the model and memory allow it, else HFForward; LAST_RUN["fast_forward"] is True or
    the reason it was not used."""
    from loralab.engine.fast_forward import FastForward, unavailable, why_not

    lm = core_model(model)
    # With adapters read as tensors the memory was judged when they were read (AdapterSource);
    # judging it again here, with their factors now on the GPU, could only refuse them late.
    check = why_not if lora is not None else unavailable
    reason = check(lm) if settings.fast_forward else "off (fast_forward=False)"
    LAST_RUN["fast_forward"] = reason or True
    if lora is not None and reason:
        raise RuntimeError(f"an adapter read as tensors needs the fast forward: {reason}")
    compile_decode = settings.compile and lm.lm_head.weight.device.type == "cuda"
    if reason is None:
        return FastForward(lm, lora, compile_=compile_decode)
    return HFForward(lm, compile_decode=compile_decode)


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


class _PrefillWriter(_cache_base()):
    """Prefill's view of a StaticKV: writes a block of rows/slots, attends over a cache slice.

    `write` = (rows, first slot) where the new keys go (a batch-1 prefix broadcasts to every
    row); `read` = (rows, end slot) of what the block's queries attend to.
    """

    is_compileable = False

    def __init__(self, cache: StaticKV, write: tuple[slice, int], read: tuple[slice, int]):
        self.cache, self.write, self.read = cache, write, read
        self.layers = []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        (rows, start), (read_rows, end) = self.write, self.read
        stop = start + key_states.shape[2]
        keys, values = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        keys[rows, :, start:stop] = key_states.to(keys.dtype)
        values[rows, :, start:stop] = value_states.to(values.dtype)
        return keys[read_rows, :, :end], values[read_rows, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def _static_generate(model, ids, settings, stop_ids, pad_id, forward) -> list[list[int]]:
    import torch

    lm = core_model(model)
    device = next(lm.parameters()).device
    dtype = next(p.dtype for p in lm.parameters() if p.is_floating_point())
    shared = common_prefix_length(ids) if settings.shared_prefix else 0
    shared = shared if shared >= MIN_SHARED_PREFIX else 0
    LAST_RUN["shared_prefix"] = shared
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
    runner = _graph_runner(step_fn, device, settings)
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
    forward.prefill(cache, input_ids, positions, _additive(causal[None, None], dtype),
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
    return forward.prefill(cache, group_ids, positions, _additive(allowed[:, None], dtype),
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
        mask = _additive(s.key_valid[:, None, None, :], dtype)
        logits = forward.decode(cache, s.token, s.position, mask)
        token = logits.argmax(-1)
        cache.advance(1)
        s.position.add_(1)
        s.token.copy_(token[:, None])
        s.out.index_copy_(1, s.written.view(1), token[:, None])
        s.written.add_(1)

    return step


def _graph_runner(step, device, settings: GenSettings):
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
                LAST_RUN["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
                warnings.warn(f"CUDA graph capture failed, decoding eagerly: {exc}", stacklevel=2)
                calls["n"] = -(10**9)
                return
            calls["graph"] = graph
            LAST_RUN.update(cuda_graph=True, capture_seconds=round(time.perf_counter() - started, 4))

    return run


def _all_stopped(out, stop) -> bool:
    import torch

    return bool(torch.isin(out, stop).any(dim=1).all())
