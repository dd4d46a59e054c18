"""Training throughput on 1 and 2 GPUs, side by side in one run (loralab's data parallelism).

Qwen2.5-7B shapes with random bf16 weights, r=8 on the 7 projections, the fast path at its
defaults, dropout 0 (so the 1- and 2-GPU losses can be compared step by step), lengths uniform
150-384 with the last 25% labelled. Each job is a fresh `torchrun` of this file's worker:
  one_gpu_global16   1 process, 16 sequences a step (the seed's effective batch)
  one_gpu_global8    1 process, 8 a step: one GPU's share of the next job (2x this = its ceiling)
  two_gpu_global16   2 processes, the same 16 sequences a step (8 per GPU)      goal >= 1.6x
  two_gpu_global32   2 processes, 32 sequences a step (16 per GPU)             goal >= 1.9x
Tokens/s is the median over steps after the warm-up (compile, new shapes) of the whole job's
tokens; the losses of the first 20 steps of the 2-GPU global-16 job are set against the 1-GPU job.

    python bench/multi_gpu.py --out $OUT                 # on a machine with 2 GPUs
    python bench/multi_gpu.py --out $OUT --steps 8 --warm 3 --jobs one_gpu_global16   # smoke
    python bench/multi_gpu.py --out $OUT --steps 8 --warm 3 \
        --jobs fsdp_72b,fsdp_32b_capped,one_gpu_32b_capped      # FSDP: sharding, measured
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    SEVEN_B,
    TARGETS,
    NoTokenizer,
    build_model,
    median,
    seed_like_examples,
)
from record import write_run  # noqa: E402

SHAPES = {  # Qwen2.5 configs beyond 7B (random bf16 weights, built on the meta device)
    "32b": dict(SEVEN_B, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                num_attention_heads=40, num_key_value_heads=8),
    "72b": dict(SEVEN_B, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8),
}
FSDP_JOBS = {  # name: (processes, sequences per step, shape, per-process memory cap GiB or 0)
    "fsdp_72b": (2, 16, "72b", 0),  # 145 GB of weights: does not fit one H200
    "fsdp_32b_capped": (2, 16, "32b", 48),  # 65 GB of weights under a 48 GiB cap per process
    "one_gpu_32b_capped": (1, 16, "32b", 48),  # the same cap without sharding: must not fit
}
JOBS = {  # name: (processes, sequences per optimizer step)
    "one_gpu_global16": (1, 16),
    "one_gpu_global8": (1, 8),  # what one GPU does with a 2-GPU job's share: the ceiling
    "two_gpu_global16": (2, 16),
    "two_gpu_global32": (2, 32),
}


def worker(args: argparse.Namespace) -> None:
    """One process of a job: build the model on its GPU, train, rank 0 writes the figures."""
    import torch

    from loralab.config import config_from_dict
    from loralab.train.dist import from_env, shutdown
    from loralab.train.loop import Base, train_adapter

    dist = from_env()
    if args.memory_cap_gib:
        total = torch.cuda.get_device_properties(dist.device).total_memory
        torch.cuda.set_per_process_memory_fraction(args.memory_cap_gib * 2**30 / total, dist.device)
    model = worker_model(args.shape, dist) if args.shape else build_model(SEVEN_B)
    examples = seed_like_examples(4000)
    out = Path(dist.share(tempfile.mkdtemp(prefix="mgpu_")))
    cfg = config_from_dict({
        "output_dir": str(out), "model": {"path": "7b-shapes"},
        "data": {"path": "random", "max_length": 384},
        "lora": {"target_modules": TARGETS, "dropout": 0.0},
        "train": {"max_steps": args.steps, "batch_size": args.global_batch, "grad_accum": 1,
                  "save_every": 0, "strategy": "fsdp" if args.shape else "ddp"},
        "tracking": {"backend": "none"},
    }).validate()

    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    peft_model, result = train_adapter(cfg, Base(model, NoTokenizer(), dist.device),
                                       data=(examples, {"kept": len(examples)}), overwrite=True,
                                       show_progress=False, dist=dist)
    wall = time.time() - t0
    peaks = dist.gather(round(torch.cuda.max_memory_allocated() / 2**30, 2))
    if dist.is_main:
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        Path(args.result).write_text(json.dumps({
            "processes": dist.world, "global_batch": args.global_batch,
            "tokens_per_s": median([r["tokens_per_s"] for r in rows[args.warm:]]),
            "step_tokens_per_s": [round(r["tokens_per_s"]) for r in rows],
            "losses": [r["loss"] for r in rows], "grad_norms": [r["grad_norm"] for r in rows],
            "peak_gib_per_gpu": peaks, "wall_s": round(wall, 1), "fast_path": result["fast_path"],
            "fsdp": result.get("fsdp"),
        }))
    peft_model.unload()
    shutdown()


def worker_model(shape: str, dist):
    """A base of SHAPES[shape] built on the meta device: each process materialises only its
    shards (train/fsdp.py); one process holds it whole on its GPU (or runs out of memory)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, Qwen2Config

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(Qwen2Config(**SHAPES[shape]), dtype=torch.bfloat16)
    model.requires_grad_(False)
    model.config.use_cache = False
    if dist.world == 1:  # nothing to shard
        from loralab.train.fsdp import move_to

        move_to(model, dist.device)
    return model


def run_job(name: str, args: argparse.Namespace, out: Path) -> dict:
    procs, batch, shape, cap = FSDP_JOBS[name] if name in FSDP_JOBS else (*JOBS[name], "", 0)
    result = out / f"{name}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
           __file__, "--worker", "--global-batch", str(batch), "--steps", str(args.steps),
           "--warm", str(args.warm), "--result", str(result), "--shape", shape,
           "--memory-cap-gib", str(cap)]
    t0 = time.time()
    with open(out / f"{name}.log", "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        print(f"{name}: FAILED (exit {code}), see {name}.log", flush=True)
        return {"job": name, "error": f"exit {code}"}
    row = {"job": name, **json.loads(result.read_text()), "job_wall_s": round(time.time() - t0, 1)}
    print(name, json.dumps({k: v for k, v in row.items() if k not in ("losses", "grad_norms",
                                                                       "step_tokens_per_s", "fast_path")}),
          flush=True)
    return row


def compare(rows: dict[str, dict]) -> dict:
    base = rows.get("one_gpu_global16", {})
    out = {}
    for name in ("two_gpu_global16", "two_gpu_global32"):
        if "tokens_per_s" in rows.get(name, {}) and "tokens_per_s" in base:
            out[f"{name}_speedup"] = round(rows[name]["tokens_per_s"] / base["tokens_per_s"], 3)
    two = rows.get("two_gpu_global16", {})
    if "losses" in two and "losses" in base:
        pairs = list(zip(base["losses"][:20], two["losses"][:20], strict=False))
        out["loss_max_rel_diff_first20"] = max(abs(b - a) / abs(a) for a, b in pairs)
        out["grad_norm_max_rel_diff_first20"] = max(
            abs(b - a) / abs(a) for a, b in zip(base["grad_norms"][:20], two["grad_norms"][:20],
                                                strict=False))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warm", type=int, default=5)
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--commit", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--global-batch", type=int, default=16, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="", help=argparse.SUPPRESS)
    ap.add_argument("--memory-cap-gib", type=float, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"model": "Qwen2.5-7B shapes, random bf16 weights", "lora_r": 8, "lora_alpha": 32,
              "targets": TARGETS, "dropout": 0, "levers": "fast path defaults",
              "lengths": "uniform 150-384, last 25% labelled", "steps": args.steps,
              "untimed_warmup_steps": args.warm, "jobs": args.jobs.split(","),
              "visible_gpus": os.environ.get("CUDA_VISIBLE_DEVICES", "all")}
    print("config", json.dumps(config), flush=True)
    jobs = {name: run_job(name, args, out) for name in args.jobs.split(",")}
    summary = compare(jobs)
    print("summary", json.dumps(summary), flush=True)
    rows = [{"job": name, **job} for name, job in jobs.items()]
    path = write_run(out, "multi_gpu", config=config, rows=rows, summary=summary,
                     commit=args.commit)
    print("result", path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
