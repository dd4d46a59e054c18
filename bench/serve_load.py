"""`loralab serve` under load: continuous batching vs a naive server, one adapter vs four mixed.

On CUDA: Qwen2.5-7B shapes with random bf16 weights (no download), 4 random r=8 adapters on the
7 projections saved as PEFT folders, prompts of the eval set's length (250-330 tokens inside
the chat frame), 60 new tokens per request. Client processes (bench/serve_clients.py, 16
clients each, their own GILs) run 16 and then 64 concurrent streaming clients for --seconds
each against the server in this process; tokens/s and the engine's busy time are the server's
own counters over the window, time to first token and per-token latency the clients'. Then the same model behind `--engine naive` (HF generate
per request, one at a time) with 16 clients. Prints config, hardware, commit, date; writes JSON.
`--prefill-chunk 0` serves with whole prefills between decode steps instead of mixed steps
(chunked prefill; the server's option of the same name; default 320). `--no-hold` launches
each step at once instead of holding it until the GPU nears the end of the step before.

    PYTHONPATH=src python bench/serve_load.py --out $OUT          # ~5 min on one H200
    PYTHONPATH=src python bench/serve_load.py --smoke --out /tmp   # CPU, < 1 min

`--predict-check RUN --input FILE`: a trained run (e.g. the real Qwen2.5 0.5B) served, its
answers to FILE's first --limit inputs (16 clients at once, greedy) against `loralab predict`.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serve_clients import busy_line, run_clients

HERE = Path(__file__).resolve().parent
GOALS = {"one_adapter_64_clients_tokens_per_s": 4000, "four_over_one_64_clients": 0.9,
         "over_naive": 10}


# ---------------------------------------------------------------- model, adapters, prompts


def build(smoke: bool):
    """(model, device): 7B shapes on CUDA, a tiny Qwen2 for --smoke (CPU)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if not smoke:
        from common import SEVEN_B, build_model

        return build_model(SEVEN_B), torch.device("cuda")
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=151936,
                      tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(cfg).eval().requires_grad_(False), torch.device("cpu")


def make_adapters(model, count: int, folder: Path) -> list[Path]:
    """`count` random r=8 LoRAs on the 7 projections (non-zero B), saved as PEFT folders."""
    import torch
    from common import TARGETS
    from peft import LoraConfig, get_peft_model

    paths = []
    for k in range(count):
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        gen = torch.Generator().manual_seed(k)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.data.copy_(torch.randn(param.shape, generator=gen).to(param) * 0.01)
        paths.append(folder / f"adapter{k}")
        peft_model.save_pretrained(paths[-1])
        peft_model.unload()
    return paths


def make_prompts(count: int, low: int, high: int) -> list[list[int]]:
    """Token ids, `low`-`high` long, inside the Qwen2.5 chat frame of the eval set's prompts."""
    head = [151644, 8948, 198] + [random.Random(1).randint(0, 151000) for _ in range(36)] + [
        151645, 198, 151644, 872, 198]  # system turn of the eval set's length, then user
    tail = [151645, 198, 151644, 77091, 198]
    rng = random.Random(0)
    return [head + [rng.randint(0, 151000) for _ in range(rng.randint(low, high) - 49)] + tail
            for _ in range(count)]


def tokenizer_for_bench():
    """The builtin Qwen2.5 tokenizer where it can be built, else token ids as text."""
    try:
        from loralab.model.tokenizer import builtin_tokenizer_dir, load_tokenizer

        return load_tokenizer(builtin_tokenizer_dir(Path(tempfile.mkdtemp()) / "qwen")), "qwen2.5"
    except Exception:
        return IdsTokenizer(), "ids-as-text"


class IdsTokenizer:
    """Decodes ids as ' <id>': what the server needs when no tokenizer files are around."""

    pad_token_id, eos_token_id, unk_token_id = 151643, 151643, None

    def convert_tokens_to_ids(self, token: str) -> int:
        return 151645 if token == "<|im_end|>" else 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" {i}" for i in ids)

    def __len__(self) -> int:
        return 152064


# ---------------------------------------------------------------- scenarios


def serve_scenarios(model, tokenizer, engine: str, adapters: list[Path], prompts_file: Path,
                    plan: list[tuple[str, int, float]], args) -> list[dict]:
    """Start a server with `adapters`, run each (mix, clients, seconds) of `plan`."""
    from loralab.serve.server import RunningServer, ServeOptions, build_state

    opts = ServeOptions(engine=engine, max_rows=args.max_rows, max_len=args.max_len,
                        max_queue=4096, timeout_s=3600, default_max_tokens=args.new,
                        prefill_chunk=args.prefill_chunk)
    specs = [(f"a{k}", path) for k, path in enumerate(adapters)]
    state = build_state(model, tokenizer, "base", "", specs, opts)
    state.stop_ids, state.scheduler.stop_ids = [], set()  # random weights: always `new` tokens
    if engine == "continuous":
        state.scheduler.hold = not args.no_hold
    rows = []
    with RunningServer(state) as server:
        for mix, clients, seconds in plan:
            models = ["a0"] if mix == "one" else [name for name, _ in specs]
            started = time.perf_counter()
            row = run_clients(server.url, models, prompts_file, clients, seconds, args.new,
                              state.metrics)
            row.update(engine=engine, mix=mix, wall_s=round(time.perf_counter() - started, 1))
            if mix != "warmup":
                rows.append(row)
                print(f"{engine:10s} {mix:5s} {clients:3d} clients: "
                      f"{row['tokens_per_s']:8,.0f} new tokens/s, ttft p50 "
                      f"{row['ttft_p50_s']} s p99 {row['ttft_p99_s']} s, per token p50 "
                      f"{row['per_token_p50_s']} s, {row['requests']} requests, "
                      f"errors {row['errors']}" + busy_line(row), flush=True)
        m = state.metrics
        stats = {"engine": engine, "decode_steps": m.steps, "prefills": m.prefills,
                 "mean_step_ms": 1000 * m.step_seconds / max(m.steps, 1),
                 "mean_prefill_ms": 1000 * m.prefill_seconds / max(m.prefills, 1),
                 "mixed_steps": m.mixed_steps,
                 "mean_mixed_ms": 1000 * m.mixed_seconds / max(m.mixed_steps, 1)}
        if engine == "continuous":
            stats.update(state.scheduler.batch.stats)
        print(f"{engine}: {stats}", flush=True)
        rows.append({"engine_stats": stats})
    return rows


def summary(rows: list[dict], small: int, big: int) -> dict:
    """The goals' ratios: `big` clients on one adapter, four mixed / one, vs naive."""
    def rate(engine, mix, clients):
        return next((r["tokens_per_s"] for r in rows if r.get("engine") == engine
                     and r.get("mix") == mix and r.get("clients") == clients), None)

    one_big, four_big = rate("continuous", "one", big), rate("continuous", "four", big)
    one_small, naive = rate("continuous", "one", small), rate("naive", "one", small)
    return {f"one_adapter_{big}_clients_tokens_per_s": one_big,
            f"four_over_one_{big}_clients": four_big / one_big if one_big and four_big else None,
            f"over_naive_{small}_clients": one_small / naive if one_small and naive else None,
            f"over_naive_{big}_vs_{small}_clients": one_big / naive if one_big and naive
            else None,
            "goals": GOALS}


def predict_check(run: Path, inputs: Path, limit: int, new: int, unfused_too: bool = False
                  ) -> dict:
    """`loralab predict` (the batch engine) vs `loralab serve` (the continuous engine, rows
    joining each other) on the same inputs, greedy: how many answers are the same text, and
    each one that differs with the served answer asked again alone. `unfused_too`: the count
    again with the engine's shrink GEMMs apart from the base ones (before fuse_shrinks)."""
    predicted = Path(tempfile.mkdtemp()) / "predict.jsonl"
    subprocess.run([sys.executable, "-m", "loralab.cli", "predict", "--adapter", str(run),
                    "--input", str(inputs), "--limit", str(limit), "--max-new-tokens", str(new),
                    "--out", str(predicted)], check=True)
    want = [json.loads(line)["generation"] for line in predicted.read_text().splitlines()]
    got, alone = served_answers(run, inputs, limit, new, fuse=True, again=want)
    differ = [i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b]
    result = {"run": str(run), "inputs": len(want), "same_text": len(want) - len(differ),
              "differ": differ,
              "pairs": [{"input": i, "served": got[i], "predicted": want[i],
                         "served_alone": alone[i], "same_alone": alone[i] == want[i],
                         "first_difference_at_char": first_difference(got[i], want[i])}
                        for i in differ]}
    print(f"serve vs predict: {result['same_text']}/{len(want)} answers the same text",
          flush=True)
    if unfused_too:
        plain, _ = served_answers(run, inputs, limit, new, fuse=False, again=None)
        result["unfused"] = {"same_text": sum(a == b for a, b in zip(plain, want, strict=True)),
                             "differ": [i for i, (a, b) in enumerate(zip(plain, want,
                                                                         strict=True)) if a != b]}
        print(f"unfused: {result['unfused']['same_text']}/{len(want)}", flush=True)
    return result


def served_answers(run: Path, inputs: Path, limit: int, new: int, fuse: bool,
                   again: list[str] | None) -> tuple[list[str], dict[int, str]]:
    """The run's served answers to the first `limit` inputs (16 clients at once, greedy), and
    for each that differs from `again`, the answer asked again alone."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from loralab.evaluate.inputs import read_inputs
    from loralab.evaluate.runner import single_run
    from loralab.model.load import load_base_model
    from loralab.serve.server import RunningServer, ServeOptions, build_state

    _, cfg = single_run(run)
    model, tokenizer = load_base_model(cfg.model)
    state = build_state(model, tokenizer, "base", cfg.model.path, [], ServeOptions(
        max_len=4096, max_rows=64))
    state.scheduler.batch.fuse_shrinks = fuse
    state.registry.add_now(state.registry.prepare("run", run))
    asks = read_inputs(inputs)[:limit]
    with RunningServer(state) as server, ThreadPoolExecutor(16) as pool:
        def ask(x):
            body = {"model": "run", "messages": x["messages"], "temperature": 0,
                    "max_tokens": new}
            reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=600)
            return reply.json()["choices"][0]["message"]["content"]

        got = list(pool.map(ask, asks))
        alone = {i: ask(asks[i]) for i, text in enumerate(again or []) if got[i] != text}
    return got, alone


def first_difference(a: str, b: str) -> int:
    """The first index where a and b differ (the shorter's length when one starts the other)."""
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, seconds")
    parser.add_argument("--out", type=Path,
                        help="results folder: OUT/serve_load/<date>_<commit>_<hardware>.json")
    parser.add_argument("--commit", help="loralab's commit, where the tree has no git history")
    parser.add_argument("--seconds", type=float, help="window per scenario (default 25; smoke 2)")
    parser.add_argument("--naive-seconds", type=float, help="the naive window (default 30)")
    parser.add_argument("--new", type=int, default=60, help="new tokens per request")
    parser.add_argument("--max-rows", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--prefill-chunk", type=int, default=320,
                        help="the server's --prefill-chunk: prompt tokens per mixed step; 0: "
                        "whole prefills between decode steps (the A/B)")
    parser.add_argument("--no-naive", action="store_true")
    parser.add_argument("--no-hold", action="store_true",
                        help="launch each step at once, not held until the GPU nears the end "
                        "of the step before (serve/pacing.py; the A/B)")
    parser.add_argument("--predict-check", type=Path, metavar="RUN",
                        help="compare a trained run's served answers with loralab predict")
    parser.add_argument("--input", type=Path, help="inputs for --predict-check")
    parser.add_argument("--limit", type=int, default=32, help="inputs for --predict-check")
    parser.add_argument("--unfused-too", action="store_true",
                        help="--predict-check also with the shrink GEMMs apart (the A/B)")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from record import write_run

    if args.predict_check:
        check = predict_check(args.predict_check, args.input, args.limit, args.new,
                              args.unfused_too)
        config = {"run": str(args.predict_check), "input": str(args.input),
                  "limit": args.limit, "new_tokens": args.new}
        rows, summary_ = [check], {"same_text": check["same_text"], "inputs": check["inputs"]}
        experiment = "serve_predict_check"
    else:
        config, rows, summary_ = load_runs(args)
        experiment = "serve_load"
    print(json.dumps(summary_, indent=1))
    if args.out:
        path = write_run(args.out, experiment, config=config, rows=rows, summary=summary_,
                         commit=args.commit)
        print(f"→ {path}")


def load_runs(args: argparse.Namespace) -> tuple[dict, list[dict], dict]:
    """The load scenarios: (config, rows, summary) for record.write_run."""
    seconds = args.seconds or (1.5 if args.smoke else 25.0)
    naive_seconds = args.naive_seconds or (1.5 if args.smoke else 30.0)
    if args.smoke:
        args.new, args.max_len, args.max_rows = min(args.new, 8), 128, 16
    model, device = build(args.smoke)
    tokenizer, tokenizer_kind = tokenizer_for_bench()
    work = Path(tempfile.mkdtemp(prefix="serve_load."))
    adapters = make_adapters(model, 4, work)
    low, high = (20, 60) if args.smoke else (250, 330)
    prompts_file = work / "prompts.json"
    prompts_file.write_text(json.dumps(make_prompts(256, low, high)))
    small, big = (4, 16) if args.smoke else (16, 64)
    plan = [("warmup", big, min(seconds, 5.0)), ("one", small, seconds), ("one", big, seconds),
            ("four", small, seconds), ("four", big, seconds)]
    rows = serve_scenarios(model, tokenizer, "continuous", adapters, prompts_file, plan, args)
    if not args.no_naive:
        rows += serve_scenarios(model, tokenizer, "naive", adapters, prompts_file,
                                [("warmup", 1, 1.0), ("one", small, naive_seconds)], args)
    config = {"model": "tiny" if args.smoke else "qwen2.5-7b-shapes random bf16",
              "device": str(device), "adapters": "4 × r=8, 7 projections",
              "prompt_tokens": [low, high], "new_tokens": args.new, "max_rows": args.max_rows,
              "max_len": args.max_len, "prefill_chunk": args.prefill_chunk,
              "hold": not args.no_hold,
              "seconds": seconds, "naive_seconds": naive_seconds,
              "tokenizer": tokenizer_kind}
    stats = [r["engine_stats"] for r in rows if "engine_stats" in r]
    rows = [r for r in rows if "engine_stats" not in r]
    return config, rows, {**summary(rows, small, big), "engine_stats": stats}


if __name__ == "__main__":
    main()
