"""The continuous engine alone, without HTTP: how many new tokens/s its rows give when every
finished request is replaced at once (the server's steady state under load, minus the server),
and where one mixed step's time goes.

    PYTHONPATH=src:bench python bench/serve_step.py --out $OUT --commit SHA   # one H200, ~2 min
    PYTHONPATH=src:bench python bench/serve_step.py --smoke                   # CPU, tiny model

Qwen2.5-7B shapes (random bf16), 4 random r=8 adapters loaded on the 7 projections, every
request on adapter 1, prompts of serve_load.py (eval-set length, 250-330 tokens), 60 new tokens,
greedy. Per prefill budget (`--budgets`): a steady window with every row busy, then an eager
profile of mixed steps (GPU kernel time by kind), then the time of the step's matrix products
alone (x·Wᵀ of every layer for the step's tokens, no LoRA, no attention): the floor a step of
that many tokens could reach. `--overlap`: the scheduler's loop (launch k+1, collect k) with the
host's time per part of a turn (`--host-trace`: the CUDA runtime calls by host time);
`--unfused-too`: the steady window again with the shrink GEMMs apart (the fused shrinks' A/B).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KINDS = (("gemm", ("gemm", "nvjet", "cutlass", "xmma", "splitk")),
         ("attention", ("fmha", "flash", "attention", "efficient")),
         ("index", ("index", "scatter", "gather")),
         ("copy", ("copy", "memcpy", "cat")))


def random_loras(lm, count: int, rank: int = 8) -> dict[int, dict]:
    """{id: {module: (A, B, scale)}}: `count` adapters of `rank` on every projection."""
    import torch

    from loralab.engine.fast_forward import GROUPS

    gen = torch.Generator(device=lm.device).manual_seed(0)
    loras = {}
    for k in range(1, count + 1):
        lora = {}
        for i, layer in enumerate(lm.model.layers):
            for _, owner, names in GROUPS:
                for name in names:
                    linear = getattr(getattr(layer, owner), name)
                    a = torch.randn(rank, linear.in_features, generator=gen, device=lm.device,
                                    dtype=lm.dtype) * 0.01
                    b = torch.randn(linear.out_features, rank, generator=gen, device=lm.device,
                                    dtype=lm.dtype) * 0.01
                    lora[f"model.layers.{i}.{owner}.{name}"] = (a, b, 2.0)
        loras[k] = lora
    return loras


class Timed:
    """CUDA events around each launch(): the GPU time of everything a step queues (its inputs'
    copy, the graph replay or eager body, sampling, its tokens' copy), so GPU-busy time can be
    set against the wall time of the loop."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.pairs = cuda, []

    def launch(self, batch, budget: int):
        """batch.launch(budget), timed."""
        import torch

        if not self.cuda:
            return batch.launch(budget)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        pending = batch.launch(budget)
        end.record()
        self.pairs.append(("mixed" if pending.mixed else "decode", start, end))
        return pending

    def take(self) -> dict[str, float]:
        """{kind: GPU seconds} of the steps since the last take (waits for them)."""
        import torch

        out: dict[str, float] = {}
        if self.cuda:
            torch.cuda.synchronize()
        for kind, start, end in self.pairs:
            out[kind] = out.get(kind, 0.0) + start.elapsed_time(end) / 1000
        self.pairs = []
        return out


def window(warmup: float, seconds: float):
    """One item per loop turn: "warm" during `warmup`, "open" on the first turn of the measured
    window, then "in" until `seconds` after it opened."""
    opened, end_warm = None, time.perf_counter() + warmup
    while True:
        now = time.perf_counter()
        if opened is None and now < end_warm:
            yield "warm"
        elif opened is None:
            opened = now
            yield "open"
        elif now - opened < seconds:
            yield "in"
        else:
            return


def fill_rows(batch, prompts: list[list[int]], first: int) -> dict[int, int]:
    """Every free row begins the next prompt (numbered from `first`, on adapter 1): {row: its
    prompt's number}."""
    begun = {}
    while batch.free_rows:
        begun[batch.begin(prompts[first % len(prompts)], adapter=1)] = first
        first += 1
    return begun


def steady(batch, prompts: list[list[int]], budget: int, new: int, seconds: float,
           timed: Timed, warmup: float) -> dict:
    """Every row busy; a row that has its `new` tokens leaves and the next prompt begins in
    its place before the next step. New tokens/s over `seconds` after `warmup`."""
    for row in list(batch.rows):
        batch.free(row)
    made, nxt = {}, 0
    counts = {"steps": 0, "mixed": 0, "tokens": 0, "decode_rows": 0, "prompt_tokens": 0}
    for turn in window(warmup, seconds):
        begun = fill_rows(batch, prompts, nxt)
        made.update(dict.fromkeys(begun, 0))
        nxt += len(begun)
        if turn == "open":
            started, counts = time.perf_counter(), dict.fromkeys(counts, 0)
            timed.take()
        pending, firsts = batch.pending_tokens(), len(batch.prefilling())
        tokens = batch.collect(timed.launch(batch, budget))
        counts["steps"] += 1
        counts["tokens"] += len(tokens)
        if pending:
            counts["mixed"] += 1
            counts["prompt_tokens"] += pending - batch.pending_tokens()
            counts["decode_rows"] += len(tokens) - (firsts - len(batch.prefilling()))
        for row in tokens:
            made[row] += 1
            if made[row] >= new:
                batch.free(row)
                del made[row]
    wall = time.perf_counter() - started
    gpu = timed.take()
    mixed = max(counts["mixed"], 1)
    return {"budget": budget, "rows": batch.max_rows, "seconds": round(wall, 2),
            "new_tokens_per_s": round(counts["tokens"] / wall, 1), "steps": counts["steps"],
            "mixed_steps": counts["mixed"],
            "mean_step_ms": round(1000 * wall / max(counts["steps"], 1), 2),
            "gpu_busy": round(sum(gpu.values()) / wall, 3),
            "gpu_ms_per_step": {k: round(1000 * v / max(counts["steps"], 1), 2)
                                for k, v in gpu.items()},
            "mixed_prompt_tokens": round(counts["prompt_tokens"] / mixed, 1),
            "mixed_decode_rows": round(counts["decode_rows"] / mixed, 1),
            "captures": batch.stats["captures"], "graph_error": batch.stats["graph_error"]}


def overlapped(batch, prompts: list[list[int]], budget: int, new: int, seconds: float,
               warmup: float, sync_check: bool, host_trace: bool = False) -> dict:
    """The scheduler's loop without HTTP: launch step k+1, then collect step k (a request whose
    last token is in flight leaves its row before the next launch). New tokens/s, the host's
    wall time per step in each part of the turn (freeing finished rows, beginning new ones,
    launch(), collect()), and with `sync_check` the first operation inside a launch that
    synchronises with the GPU (torch's sync debug mode "error"; the engine's own waits on CUDA
    events are not such operations), else None. With `host_trace`, after the window: the CUDA
    runtime calls of 20 more turns by host time (which of them block the host thread)."""
    import collections

    import torch

    for row in list(batch.rows):
        batch.free(row)
    owner, made, flying = {}, collections.Counter(), collections.Counter()
    state = {"serial": 0, "prev": None, "found": None}
    parts = ("free", "begin", "launch", "collect")
    times = dict.fromkeys(parts, 0.0)
    counts = {"steps": 0, "tokens": 0}

    def turn_once(times: dict, counts: dict) -> None:
        clock = time.perf_counter()
        for row, req in list(owner.items()):  # its last token is in flight (or collected)
            if made[req] + flying[req] >= new:
                batch.free(row)
                del owner[row]
        clock = lap(times, "free", clock)
        begun = fill_rows(batch, prompts, state["serial"])
        owner.update(begun)
        state["serial"] += len(begun)
        clock = lap(times, "begin", clock)
        check = sync_check and state["found"] is None and batch.device.type == "cuda"
        if check:
            torch.cuda.set_sync_debug_mode("error")
        try:
            pending = batch.launch(budget)
        except RuntimeError as exc:  # a synchronising operation inside launch
            import traceback

            state["found"] = traceback.format_exc(limit=-8)[-1500:] + str(exc)[:200]
            torch.cuda.set_sync_debug_mode("default")
            return
        finally:
            if check:
                torch.cuda.set_sync_debug_mode("default")
        clock = lap(times, "launch", clock)
        owners = {row: owner[row] for row in pending.rows}
        flying.update(owners.values())
        if state["prev"] is not None:
            clock = time.perf_counter()
            prev, prev_owners = state["prev"]
            tokens = batch.collect(prev)
            lap(times, "collect", clock)
            for row in tokens:
                req = prev_owners[row]
                flying[req] -= 1
                made[req] += 1
            counts["tokens"] += len(tokens)
        counts["steps"] += 1
        state["prev"] = (pending, owners)

    for turn in window(warmup, seconds):
        if turn == "open":
            started, counts, times = (time.perf_counter(), dict.fromkeys(counts, 0),
                                      dict.fromkeys(parts, 0.0))
        turn_once(times, counts)
    wall = time.perf_counter() - started
    steps = max(counts["steps"], 1)
    row = {"budget": budget, "mode": "overlapped", "seconds": round(wall, 2),
           "new_tokens_per_s": round(counts["tokens"] / wall, 1), "steps": counts["steps"],
           "mean_step_ms": round(1000 * wall / steps, 2),
           "host_ms_per_step": {k: round(1000 * v / steps, 3) for k, v in times.items()},
           "sync_in_launch": state["found"] if sync_check and batch.device.type == "cuda"
           else "not checked (CUDA only)"}
    if host_trace and batch.device.type == "cuda":
        row["runtime_calls"] = runtime_calls(lambda: turn_once(dict.fromkeys(parts, 0.0),
                                                               dict.fromkeys(counts, 0)), 20)
    return row


def lap(times: dict, part: str, since: float) -> float:
    """times[part] += the seconds since `since`; now."""
    now = time.perf_counter()
    times[part] += now - since
    return now


def runtime_calls(turn, turns: int) -> list[dict]:
    """The CUDA runtime/driver calls of `turns` calls of turn() by host milliseconds per turn,
    costliest first: a call that waits for the GPU (an event or stream synchronize, or a
    launch into a full queue) shows here with most of the turn's time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(turns):
            turn()
    calls = [(e.cpu_time_total / 1000 / turns, e.count / turns, e.key)
             for e in prof.key_averages() if e.key.startswith("cu")]
    calls.sort(reverse=True)
    return [{"ms": round(ms, 3), "calls": round(n, 1), "name": name[:60]}
            for ms, n, name in calls[:12]]


def profile_mixed(batch, prompts: list[list[int]], budget: int, steps: int = 3) -> dict:
    """GPU kernel time of `steps` eager mixed steps by kind (gemm, attention, index, copy,
    other), per step, and the 30 costliest kernels. Before each step enough rows are given new
    prompts (a decoding row freed for each) that the step feeds its whole budget."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    def top_up() -> None:
        k = 0
        while batch.pending_tokens() < budget:
            if not batch.free_rows:
                batch.free(next(r for r in batch.busy() if r not in batch.prefilling()))
            batch.begin(prompts[k % len(prompts)], adapter=1)
            k += 1

    use_graph, batch.use_graph = batch.use_graph, False
    try:
        for _ in range(2):  # warm
            top_up()
            batch.step(budget)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                top_up()
                batch.step(budget)
            torch.cuda.synchronize()
    finally:
        batch.use_graph = use_graph
    kinds: dict[str, float] = {}
    kernels = []
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
        if not us or event.key.startswith("cuda") or event.key.startswith("aten::"):
            continue
        name = event.key.lower()
        kind = next((k for k, words in KINDS if any(w in name for w in words)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + us / 1000 / steps
        kernels.append((us / 1000 / steps, event.count // steps, event.key[:90]))
    kernels.sort(reverse=True)
    return {"budget": budget, "eager_gpu_ms_per_step": round(sum(kinds.values()), 2),
            "by_kind_ms": {k: round(v, 2) for k, v in sorted(kinds.items())},
            "top_kernels": [{"ms": round(ms, 3), "calls": n, "name": name}
                            for ms, n, name in kernels[:30]]}


def gemm_floor(batch, tokens: int, repeat: int = 5) -> float:
    """Milliseconds of every layer's four x·Wᵀ for `tokens` tokens (plus the head for the
    rows): the matrix products of a step and nothing else."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    x = torch.randn(tokens, batch.layers[0].qkv.shape[1], device=batch.device, dtype=batch.dtype)
    mid = torch.randn(tokens, batch.layers[0].down.shape[1], device=batch.device,
                      dtype=batch.dtype)
    rows = x[: batch.max_rows]

    def once() -> None:
        for w in batch.layers:
            F.linear(x, w.qkv)
            F.linear(x, w.o)
            F.linear(x, w.gate_up)
            F.linear(mid, w.down)
        F.linear(rows, batch.lm.lm_head.weight)

    once()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        once()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / repeat, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--commit")
    parser.add_argument("--budgets", default="256,320,384")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--new", type=int, default=60)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--overlap", action="store_true",
                        help="also the scheduler's overlapped loop (launch k+1, collect k), "
                        "with a check for synchronising operations inside launch()")
    parser.add_argument("--unfused-too", action="store_true",
                        help="then the same steady window with the shrink GEMMs of qkv and "
                        "gate_up apart from the base ones (before continuous_lora.fuse_shrinks)")
    parser.add_argument("--host-trace", action="store_true",
                        help="with --overlap: the CUDA runtime calls of 20 turns by host time")
    parser.add_argument("--compile-forward", action="store_true",
                        help="experiment: the mixed step's body through torch.compile (one "
                        "graph per bucket, all layers unrolled) before the CUDA graph")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    import torch
    from record import write_run
    from serve_load import build, make_prompts

    from loralab.engine.continuous import ContinuousBatch

    model, device = build(args.smoke)
    low, high = (20, 60) if args.smoke else (250, 330)
    if args.smoke:
        args.seconds, args.rows, args.new = 1.0, 8, 8
    prompts = make_prompts(256, low, high)
    batch = ContinuousBatch(model, max_rows=args.rows, max_len=512)
    batch.set_adapters(random_loras(model, 4))
    timed = Timed(device.type == "cuda")
    if args.compile_forward:
        import loralab.engine.continuous_mixed as mixed

        torch._dynamo.config.cache_size_limit = 64
        mixed.forward = torch.compile(mixed.forward, dynamic=False)
    rows = []
    for budget in [int(b) for b in args.budgets.split(",")]:
        with torch.inference_mode():
            if args.compile_forward:  # its compilations, one per bucket, out of the window
                steady(batch, prompts, budget, args.new, 2.0, timed, warmup=0.0)
            row = steady(batch, prompts, budget, args.new, args.seconds, timed,
                         warmup=1.0 if args.smoke else 4.0)
            row["fused_shrinks"] = batch.fuse_shrinks
            if device.type == "cuda":
                row["gemm_floor_ms"] = gemm_floor(batch, args.rows + budget)
                if not args.no_profile:
                    row["profile"] = profile_mixed(batch, prompts, budget)
        rows.append(row)
        print({k: v for k, v in row.items() if k != "profile"}, flush=True)
        if "profile" in row:
            print(row["profile"], flush=True)
        if args.overlap:
            with torch.inference_mode():
                rows.append(overlapped(batch, prompts, budget, args.new, args.seconds,
                                       warmup=1.0 if args.smoke else 4.0, sync_check=True,
                                       host_trace=args.host_trace))
            print(rows[-1], flush=True)
    if args.unfused_too:
        batch.fuse_shrinks = False
        batch.set_adapters(random_loras(model, 4))
        for budget in [int(b) for b in args.budgets.split(",")]:
            with torch.inference_mode():
                row = steady(batch, prompts, budget, args.new, args.seconds, timed,
                             warmup=1.0 if args.smoke else 4.0)
            rows.append({**row, "fused_shrinks": False})
            print(rows[-1], flush=True)
    config = {"model": "tiny" if args.smoke else "qwen2.5-7b-shapes random bf16",
              "adapters": "4 × r=8 loaded, every request on adapter 1",
              "prompt_tokens": [low, high], "new_tokens": args.new, "rows": args.rows,
              "seconds": args.seconds, "compile_forward": args.compile_forward}
    if args.out:
        print("→", write_run(args.out, "serve_step", config=config, rows=rows,
                             commit=args.commit))


if __name__ == "__main__":
    main()
