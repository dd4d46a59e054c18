"""Where one decode step's time goes: the whole step vs its GEMMs vs its attention, each
replayed as a CUDA graph (so launch overhead is out), plus the weight-read floor.

Called by eval_speed.py --step-breakdown on CUDA; rows are printed and saved with the rest.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from loralab.engine.fast_forward import FastForward
from loralab.engine.kv_cache import StaticKV


def graph_ms(fn, replays: int = 50) -> float:
    """Milliseconds per replay of `fn` captured in a CUDA graph (after two eager warm-ups)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def events_ms(fn, repeats: int = 3) -> float:
    """Median milliseconds of `fn` run eagerly (CUDA events), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def layer_gemms(layers, x, intermediate: int, head=None) -> None:
    """Every layer's four GEMMs (and the head's) on rows x, nothing else of the layer."""
    for w in layers:
        F.linear(x, w.qkv, w.qkv_bias)
        F.linear(x, w.o)
        up = F.linear(x, w.gate_up)
        F.linear(up[:, :intermediate], w.down)
    if head is not None:
        F.linear(x, head)


def matmul_attention(q, keys, values, mask):
    """The previous decode attention: grouped matmuls with float scores."""
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() + mask.float()
    return torch.matmul(torch.softmax(scores, -1).to(values.dtype), values)


def flex_ms(q, cache, mask, layers) -> float:
    """Decode attention through flex_attention (its split-KV decoding kernel for short
    queries), padding masked with a score_mod reading each row's valid slots."""
    from torch.nn.attention.flex_attention import flex_attention

    valid = mask[:, 0, 0, :] == 0  # [batch, cache length]

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(valid[b, kv_idx], score, -float("inf"))

    flex = torch.compile(flex_attention, dynamic=False)
    return graph_ms(lambda: [flex(q, cache.keys[i], cache.values[i], score_mod=score_mod,
                                  enable_gqa=True) for i in layers])


def decode_step_breakdown(lm: Any, batch: int, length: int, compile_: bool) -> list[dict]:
    fast = FastForward(lm)
    cfg, dev = lm.config, lm.lm_head.weight.device
    dtype = lm.lm_head.weight.dtype
    cache = StaticKV(cfg, batch, length, dtype, dev)
    cache.offset.fill_(length - 61)
    token = torch.randint(0, 150000, (batch, 1), device=dev)
    position = torch.full((batch, 1), length - 61, device=dev)
    mask = torch.zeros(batch, 1, 1, length, dtype=dtype, device=dev)
    x = torch.randn(batch, cfg.hidden_size, dtype=dtype, device=dev)
    rows = []

    def row(name: str, ms: float, **extra) -> None:
        rows.append({"name": name, "ms": round(ms, 3), **extra})

    with torch.inference_mode():
        shape = {"batch": batch, "cache_length": length}
        row("decode_step_whole", graph_ms(lambda: fast.decode(cache, token, position, mask)),
            **shape)
        compiled = FastForward(lm, compile_=True) if compile_ else None
        if compiled is not None:
            row("decode_step_whole_compiled",
                graph_ms(lambda: compiled.decode(cache, token, position, mask)), **shape)

        def gemms() -> None:  # reads x when called: the row counts below rebind it
            layer_gemms(fast.layers, x, cfg.intermediate_size, lm.lm_head.weight)

        weight_bytes = sum(t.nbytes for w in fast.layers for t in (w.qkv, w.o, w.gate_up, w.down))
        weight_bytes += lm.lm_head.weight.nbytes
        ms = graph_ms(gemms)
        row("decode_step_gemms_only", ms, weight_gb=round(weight_bytes / 1e9, 2),
            gemm_bandwidth_tb_s=round(weight_bytes / ms / 1e9, 2), **shape)
        for m in (64, 80, 96, 128):  # would padding the decode batch help the GEMMs?
            x = torch.randn(m, cfg.hidden_size, dtype=dtype, device=dev)
            row(f"decode_step_gemms_only_rows{m}", graph_ms(gemms), rows=m)
        rows += attention_rows(fast, cache, mask, batch, shape)
        big = torch.empty(weight_bytes // 2, dtype=dtype, device=dev)
        copy_ms = graph_ms(lambda: big.mul_(1), replays=10)  # one read + one write of it all
        row("decode_step_weight_read_floor", copy_ms / 2,
            note="half of an in-place pass over as many bytes")
        big = None
        rows += prefill_breakdown(lm, fast, compiled, cache, rows=26, tokens=290)
    return rows


def attention_rows(fast: Any, cache: Any, mask: Any, batch: int, shape: dict) -> list[dict]:
    """One decode step's attention alone, over every layer's cache: grouped matmuls, SDPA with
    the query heads as positions, SDPA's GQA path, flex_attention."""
    s, dtype, dev = fast.shape, mask.dtype, mask.device
    q = torch.randn(batch, s.kv_heads, s.heads // s.kv_heads, s.head_dim, dtype=dtype, device=dev)
    q_flat = q.reshape(batch, s.heads, 1, s.head_dim)
    layers = range(len(fast.layers))
    timed = {
        "matmul": lambda: [matmul_attention(q, cache.keys[i], cache.values[i], mask)
                           for i in layers],
        "sdpa": lambda: [F.scaled_dot_product_attention(q, cache.keys[i], cache.values[i],
                                                        attn_mask=mask) for i in layers],
        "sdpa_gqa": lambda: [F.scaled_dot_product_attention(
            q_flat, cache.keys[i], cache.values[i], attn_mask=mask, enable_gqa=True)
            for i in layers],
    }
    rows = [{"name": f"decode_step_attention_only_{k}", "ms": round(graph_ms(fn), 3), **shape}
            for k, fn in timed.items()]
    try:
        rows.append({"name": "decode_step_attention_only_flex",
                     "ms": round(flex_ms(q_flat, cache, mask, layers), 3), **shape})
    except Exception as exc:  # measuring: a failure is a result
        rows.append({"name": "decode_step_attention_only_flex",
                     "error": f"{type(exc).__name__}: {exc}"[:300]})
    return rows


def prefill_breakdown(lm, fast, compiled, cache, rows: int, tokens: int) -> list[dict]:
    """One prefill row group (as the engine's default 3 groups of 77 prompts make), eager and
    compiled, against its GEMMs alone."""
    dev, hidden = lm.lm_head.weight.device, lm.config.hidden_size
    ids = torch.randint(0, 150000, (rows, tokens), device=dev)
    positions = torch.arange(tokens, device=dev)[None].expand(rows, tokens)
    causal = torch.ones(tokens, tokens, dtype=torch.bool, device=dev).tril()
    mask = torch.where(causal, 0.0, torch.finfo(lm.dtype).min).to(lm.dtype)[None, None]
    mask = mask.expand(rows, 1, tokens, tokens)
    where = ((slice(0, rows), 0), (slice(0, rows), tokens))
    x = torch.randn(rows * tokens, hidden, dtype=lm.dtype, device=dev)
    out = []
    flops = 2 * rows * tokens * sum(t.numel() for w in fast.layers
                                    for t in (w.qkv, w.o, w.gate_up, w.down))

    def row(name: str, ms: float) -> None:
        out.append({"name": name, "ms": round(ms, 2), "rows": rows, "tokens": tokens,
                    "gemm_tflop_s_equivalent": round(flops / ms / 1e9, 1)})

    row("prefill_group_eager", events_ms(lambda: fast.prefill(cache, ids, positions, mask,
                                                              *where)))
    if compiled is not None:
        row("prefill_group_compiled", events_ms(lambda: compiled.prefill(
            cache, ids, positions, mask, *where)))

    row("prefill_group_gemms_only", events_ms(
        lambda: layer_gemms(fast.layers, x, lm.config.intermediate_size)))
    s = fast.shape
    q = torch.randn(rows, s.heads, tokens, s.head_dim, dtype=lm.dtype, device=dev)
    kv = torch.randn(rows, s.kv_heads, tokens, s.head_dim, dtype=lm.dtype, device=dev)
    group = s.heads // s.kv_heads
    layers = range(len(fast.layers))
    row("prefill_group_attention_repeat_kv", events_ms(lambda: [F.scaled_dot_product_attention(
        q, kv.repeat_interleave(group, 1), kv.repeat_interleave(group, 1), attn_mask=mask)
        for _ in layers]))
    row("prefill_group_attention_enable_gqa", events_ms(lambda: [F.scaled_dot_product_attention(
        q, kv, kv, attn_mask=mask, enable_gqa=True) for _ in layers]))
    return out


def numerics_rows(lm: Any, prompts: list[list[int]], n: int = 8) -> list[dict]:
    """Last-position logits of n prompts (cut to one length: no padding) from loralab's forward
    and transformers' forward in bf16, each against transformers' forward in float32."""
    import copy

    from loralab.engine.kv_cache import additive_mask as _additive

    dev = lm.lm_head.weight.device
    length = min(len(p) for p in prompts[:n])
    ids = torch.tensor([p[:length] for p in prompts[:n]], device=dev)
    positions = torch.arange(length, device=dev)[None].expand(n, length)
    causal = torch.ones(length, length, dtype=torch.bool, device=dev).tril()[None, None]
    with torch.inference_mode():
        cache = StaticKV(lm.config, n, length, lm.dtype, dev)
        fast = FastForward(lm).prefill(cache, ids, positions,
                                       _additive(causal, lm.dtype).expand(n, 1, length, length),
                                       (slice(None), 0), (slice(None), length)).float()
        hf = lm(input_ids=ids).logits[:, -1].float()
        ref_model = copy.deepcopy(lm).float()
        ref = ref_model(input_ids=ids).logits[:, -1].float()
        del ref_model
    rows = []
    for name, got in (("loralab_forward_bf16", fast), ("transformers_forward_bf16", hf)):
        rows.append({"name": f"numerics_{name}_vs_fp32", "prompts": n, "tokens": length,
                     "max_abs_diff": round(float((got - ref).abs().max()), 4),
                     "rel_l2": round(float((got - ref).norm() / ref.norm()), 5),
                     "top1_same_as_fp32": int((got.argmax(-1) == ref.argmax(-1)).sum())})
    return rows


def wall_ms(fn, repeats: int = 3) -> float:
    """Median wall milliseconds of `fn` (CPU work included), CUDA synchronised, after a warm-up."""
    import time

    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def clone_cat_build(lm: Any, lora: dict) -> list:
    """The stacked copy as commit d45d3e0 built it: every part cloned (or addmm'ed) on its own,
    then concatenated, so q/k/v and gate/up were written twice. Kept to compare with."""
    from loralab.engine.fast_forward import GROUPS, plain_linear

    layers = []
    for i, layer in enumerate(lm.model.layers):
        for _, owner, names in GROUPS:
            parts = []
            for n in names:
                weight = plain_linear(getattr(getattr(layer, owner), n)).weight
                delta = lora.get(f"model.layers.{i}.{owner}.{n}")
                parts.append(weight.clone() if delta is None else torch.addmm(
                    weight, delta[1], delta[0], alpha=delta[2]))
            layers.append(torch.cat(parts) if len(parts) > 1 else parts[0])
    return layers


def adapter_overhead_rows(lm: Any, folder: Any) -> list[dict]:
    """What one adapter read from its folder adds to a run on merged weights: reading the file
    (cast, pinned), copying its factors to the GPU, and building the weight copy with the fold
    vs without it."""
    from concurrent.futures import ThreadPoolExecutor

    from loralab.engine.fast_forward import build_layers
    from loralab.engine.lora_weights import load_lora_file, lora_for_model

    dtype, rows = lm.lm_head.weight.dtype, []

    def row(name: str, ms: float) -> None:
        rows.append({"name": name, "ms": round(ms, 2)})

    row("adapter_read_file_cast_pinned", wall_ms(lambda: load_lora_file(folder, dtype, True)))
    row("adapter_read_file_cast", wall_ms(lambda: load_lora_file(folder, dtype)))
    row("adapter_read_file_as_stored", wall_ms(lambda: load_lora_file(folder)))
    with ThreadPoolExecutor(max_workers=1) as pool:  # what a round trip through a thread adds
        row("adapter_read_file_cast_pinned_in_a_thread", wall_ms(
            lambda: pool.submit(load_lora_file, folder, dtype, True).result()))
    stored, _ = load_lora_file(folder)
    row("adapter_factors_to_gpu_as_stored", wall_ms(lambda: lora_for_model(stored, lm)))
    loaded, _ = load_lora_file(folder, dtype, pin=True)
    row("adapter_factors_to_gpu_cast_pinned", wall_ms(lambda: lora_for_model(loaded, lm)))
    lora, _ = lora_for_model(loaded, lm)
    with torch.inference_mode():
        row("copy_build_plain", wall_ms(lambda: build_layers(lm)))
        row("copy_build_folded", wall_ms(lambda: build_layers(lm, lora)))
        row("copy_build_folded_clone_cat_d45d3e0", wall_ms(lambda: clone_cat_build(lm, lora)))
    return rows


def run_phases(run) -> dict[str, float]:
    """Wall milliseconds of one engine run `run()` split into its phases: setting up the
    adapter source, reading an adapter (AdapterSource.tensors), the weight copy
    (make_forward), prefill, the decode steps (graph warm-up, capture, replays), the rest."""
    import time

    from loralab.evaluate import adapters, generate, static_engine

    spent = dict.fromkeys(("source", "read", "build", "prefill", "decode"), 0.0)
    originals = {}

    def timed_call(fn, phase):
        def wrapped(*args, **kwargs):
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            torch.cuda.synchronize()
            spent[phase] += (time.perf_counter() - start) * 1e3
            return out
        return wrapped

    def patch(owner, name, phase, wrap_result=False):
        original = originals[(owner, name)] = getattr(owner, name)
        fn = (lambda *a, **k: timed_call(original(*a, **k), phase)) if wrap_result else \
            timed_call(original, phase)
        setattr(owner, name, fn)

    patch(adapters.AdapterSource, "__init__", "source")
    patch(adapters.AdapterSource, "close", "source")
    patch(adapters.AdapterSource, "tensors", "read")
    patch(generate, "make_forward", "build")
    patch(static_engine, "_prefill_rows", "prefill")
    patch(static_engine, "_prefill_prefix", "prefill")
    patch(static_engine, "_graph_runner", "decode", wrap_result=True)
    try:
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        total = (time.perf_counter() - start) * 1e3
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)
    return {**spent, "rest": total - sum(spent.values()), "total": total}
