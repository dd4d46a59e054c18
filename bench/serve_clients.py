"""The load generator of bench/serve_load.py: streaming clients in their own processes.

`run_clients` (called by serve_load.py, in the server's process) starts ceil(clients / 16)
client processes of this script; each runs its share of the streaming clients from a common
start time for --seconds and prints one JSON line of request timings. Tokens/s and the
engine's busy time come from the server's own counters over the same window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

CLIENTS_PER_PROCESS = 16


def run_clients(url: str, models: list[str], prompts_file: Path, clients: int, seconds: float,
                new: int, metrics) -> dict:
    """`clients` streaming clients for `seconds`, spread over client processes of at most
    CLIENTS_PER_PROCESS each (one asyncio loop parsing 64 streams would itself be the
    bottleneck). Tokens/s and the engine's busy time are the server's own counters over the
    window; latencies are the clients'."""
    procs = -(-clients // CLIENTS_PER_PROCESS)
    start_at = time.time() + 3.0  # the client processes start and import httpx meanwhile
    children = [subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--url", url,
         "--models", ",".join(models), "--prompts", str(prompts_file), "--clients",
         str(clients), "--procs", str(procs), "--first", str(k), "--start-at", str(start_at),
         "--seconds", str(seconds), "--new", str(new)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(procs)]
    time.sleep(max(0.0, start_at - time.time()))
    before, started = engine_counters(metrics), time.perf_counter()
    time.sleep(seconds)
    after, window = engine_counters(metrics), time.perf_counter() - started
    records, errors = [], {}
    for child in children:
        out, err = child.communicate(timeout=seconds + 300)
        if child.returncode != 0:
            raise RuntimeError(f"client process failed: {err[-2000:]}")
        part = json.loads(out.strip().splitlines()[-1])
        records += part["records"]
        for code, n in part["errors"].items():
            errors[code] = errors.get(code, 0) + n
    delta = {k: after[k] - before[k] for k in after}
    row = {"clients": clients, "client_processes": procs, "models": models,
           "window_s": round(window, 2), "tokens_in_window": delta["tokens"],
           "tokens_per_s": delta["tokens"] / window, "requests": len(records),
           "errors": errors, **latency(records)}
    if delta["steps"] or delta["mixed"]:  # the continuous engine's (the naive one has none)
        row.update(engine_breakdown(delta, window))
    return row


def engine_breakdown(delta: dict, window: float) -> dict:
    """Busy fraction, decode steps, whole prefills and mixed steps over the window."""
    busy = delta["step_s"] + delta["prefill_s"] + delta["mixed_s"]
    mixed = max(delta["mixed"], 1)
    return {"engine_busy_fraction": round(busy / window, 3),
            "collect_wait_fraction": round(delta["wait_s"] / window, 3),
            "hold_fraction": round(delta["hold_s"] / window, 3),
            "launch_ms_mean": round(1000 * delta["launch_s"] / max(delta["steps"]
                                                                   + delta["mixed"], 1), 3),
            "decode_steps": delta["steps"],
            "decode_ms_mean": round(1000 * delta["step_s"] / max(delta["steps"], 1), 2),
            "rows_per_step_mean": round(delta["step_rows"] / max(delta["steps"], 1), 1),
            "prefills": delta["prefills"],
            "prefill_ms_mean": round(1000 * delta["prefill_s"] / max(delta["prefills"], 1), 2),
            "mixed_steps": delta["mixed"],
            "mixed_ms_mean": round(1000 * delta["mixed_s"] / mixed, 2),
            "mixed_prompt_tokens_mean": round(delta["mixed_prompt"] / mixed, 1),
            "mixed_decode_rows_mean": round(delta["mixed_rows"] / mixed, 1)}


def busy_line(row: dict) -> str:
    if "engine_busy_fraction" not in row:
        return ""
    return (f"; engine busy {row['engine_busy_fraction']:.0%} of the window (waiting for the "
            f"GPU {row['collect_wait_fraction']:.0%}, holding a launch "
            f"{row['hold_fraction']:.0%}, launch {row['launch_ms_mean']} ms), decode step "
            f"{row['decode_ms_mean']} ms at {row['rows_per_step_mean']} rows, "
            f"{row['prefills']} prefills of {row['prefill_ms_mean']} ms, "
            f"{row['mixed_steps']} mixed steps of {row['mixed_ms_mean']} ms "
            f"({row['mixed_prompt_tokens_mean']} prompt tokens + "
            f"{row['mixed_decode_rows_mean']} rows)")


def engine_counters(metrics) -> dict:
    """The server's counters now: tokens, decode steps, whole prefills and mixed steps with
    their seconds."""
    with metrics.lock:
        return {"tokens": sum(metrics.generated.values()), "steps": metrics.steps,
                "step_s": metrics.step_seconds, "step_rows": metrics.step_rows,
                "prefills": metrics.prefills, "prefill_s": metrics.prefill_seconds,
                "mixed": metrics.mixed_steps, "mixed_s": metrics.mixed_seconds,
                "mixed_prompt": metrics.mixed_prompt_tokens,
                "mixed_rows": metrics.mixed_decode_rows,
                "wait_s": metrics.collect_wait_seconds, "launch_s": metrics.launch_seconds,
                "hold_s": metrics.hold_seconds}


def client_main(args: argparse.Namespace) -> None:
    """Run this process's share of the streaming clients from --start-at for --seconds; print
    one JSON line: every finished request's timings and the error counts."""
    prompts = json.loads(Path(args.prompts).read_text())
    print(json.dumps(asyncio.run(_clients(args, args.models.split(","), prompts))))


async def _clients(args: argparse.Namespace, models: list[str], prompts: list) -> dict:
    import httpx

    rng = random.Random(args.first)
    records, errors = [], {}
    mine = len(range(args.first, args.clients, args.procs))  # clients first, first+procs, ...
    limits = httpx.Limits(max_connections=mine + 4, max_keepalive_connections=mine + 4)
    async with httpx.AsyncClient(base_url=args.url, timeout=600, limits=limits) as http:
        await asyncio.sleep(max(0.0, args.start_at - time.time()))
        deadline = time.perf_counter() + args.seconds

        async def one(i: int) -> None:
            body = {"model": models[i % len(models)], "prompt": rng.choice(prompts),
                    "max_tokens": args.new, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            sent, first, tokens = time.perf_counter(), None, 0
            async with http.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    errors[response.status_code] = errors.get(response.status_code, 0) + 1
                    await response.aread()
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and first is None:
                        first = time.perf_counter()
                    tokens = chunk.get("usage", {}).get("completion_tokens", tokens)
            done = time.perf_counter()
            records.append({"ttft": (first or done) - sent, "seconds": done - sent,
                            "tokens": tokens,
                            "per_token": (done - first) / (tokens - 1) if first and tokens > 1
                            else None})

        async def worker(i: int) -> None:
            while time.perf_counter() < deadline:
                await one(i)
                i += args.clients

        tasks = [asyncio.create_task(worker(c)) for c in range(args.first, args.clients,
                                                                 args.procs)]
        await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
        _, pending = await asyncio.wait(tasks, timeout=5)  # late requests may finish...
        for task in pending:  # ...or are dropped (the naive server's queue)
            task.cancel()
    return {"records": records, "errors": errors}


def latency(records: list[dict]) -> dict:
    def pct(values, q):
        values = sorted(v for v in values if v is not None)
        return round(values[min(len(values) - 1, int(q * len(values)))], 4) if values else None

    ttft = [r["ttft"] for r in records]
    per_token = [r["per_token"] for r in records]
    return {"ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
            "per_token_p50_s": pct(per_token, 0.5), "per_token_p99_s": pct(per_token, 0.99),
            "mean_new_tokens": round(statistics.mean(r["tokens"] for r in records), 1)
            if records else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--models", required=True, help="comma list; client i asks model i % n")
    parser.add_argument("--prompts", required=True, help="JSON list of prompts (token ids)")
    parser.add_argument("--clients", type=int, required=True, help="clients in all processes")
    parser.add_argument("--procs", type=int, default=1, help="client processes in all")
    parser.add_argument("--first", type=int, default=0, help="this process: clients first, "
                        "first+procs, ...")
    parser.add_argument("--start-at", type=float, default=0.0, help="time.time() to start at")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--new", type=int, default=60, help="max_tokens per request")
    client_main(parser.parse_args())


if __name__ == "__main__":
    main()
