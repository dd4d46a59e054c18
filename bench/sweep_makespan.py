"""Makespan of the seed's data-size study: one `loralab sweep` vs one fresh process per trial.

(a) `python -m loralab.cli sweep` trains every limit in one process with the base loaded once;
(b) the same trials as separate fresh processes, one after another (what re-running the seed's
notebook per setting amounts to: import + load + train each time): `--baseline seed` runs the
seed's own recipe (bench/seed_recipe.py: HF Trainer, gradient checkpointing, padding), `--baseline
loralab` runs `python -m loralab.cli train` per trial. With `--baseline-limits`, only those trials
of the baseline run for real; the others are estimated from the measured ones (process overhead
+ tokens / measured tokens/s) and reported as estimated.

    python bench/sweep_makespan.py --device cpu --model builtin:tiny-qwen2 --limits 16,32,64 \
        --epochs 1 --out /tmp/makespan
    python bench/sweep_makespan.py --device cuda --model 7b-shapes --limits 50,100,500,1447 \
        --epochs 4 --out bench/out/makespan-h200
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SEVEN_B = dict(  # Qwen2.5-7B's shapes (see shared/models.md), random bf16 weights
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
    rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
    pad_token_id=151643,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", default="builtin:tiny-qwen2", help="builtin:tiny-qwen2 | 7b-shapes | a folder")
    p.add_argument("--limits", default="50,100,500,1447", help="data.limit of each trial")
    p.add_argument("--epochs", type=float, default=4)
    p.add_argument("--records", type=int, default=None, help="records to generate (default: max limit)")
    p.add_argument("--model-dir", default=None, help="where 7b-shapes is built (default OUT/../qwen2.5-7b-shapes)")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds, alternating which side goes first (shared machines are noisy)")
    p.add_argument("--baseline", choices=("seed", "loralab"), default="seed")
    p.add_argument("--baseline-limits", default=None,
                   help="limits the baseline runs for real (default: all); the rest are estimated")
    p.add_argument("--out", required=True, help="folder for configs, runs, logs and makespan.json")
    return p.parse_args(argv)


def build_7b_shapes(folder: Path) -> Path:
    """A random bf16 Qwen2.5-7B-shaped model folder with the Qwen2.5 tokenizer (built once)."""
    if (folder / "config.json").is_file():
        return folder
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from loralab.model.tokenizer import builtin_tokenizer_dir

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**SEVEN_B), dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    for item in builtin_tokenizer_dir().iterdir():
        shutil.copy(item, tmp / item.name)
    os.replace(tmp, folder)
    return folder


def write_configs(out: Path, model_path: str, records: Path, limits: list[int | None], epochs: float) -> tuple[Path, Path]:
    """The study's train config (seed hyperparameters) and its sweep file."""
    from loralab.config import SEED_SYSTEM_PROMPT

    base = {
        "output_dir": str(out / "unused"),
        "model": {"path": model_path},
        "data": {"path": str(records), "system_prompt": SEED_SYSTEM_PROMPT, "max_length": 384},
        "lora": {"r": 8, "alpha": 32, "dropout": 0.1},
        "train": {"lr": 1e-4, "epochs": epochs, "batch_size": 4, "grad_accum": 4, "seed": 42},
        "tracking": {"backend": "none"},
    }
    sweep = {"name": "data_size", "base": "train.yaml", "output_dir": str(out / "sweep"),
             "grid": {"data.limit": limits}, "sweep": {"parallel": 1}}
    (out / "train.yaml").write_text(yaml.safe_dump(base, allow_unicode=True), encoding="utf-8")
    (out / "sweep.yaml").write_text(yaml.safe_dump(sweep), encoding="utf-8")
    return out / "train.yaml", out / "sweep.yaml"


def timed(cmd: list[str], log: Path, env: dict[str, str]) -> float:
    """Seconds from process start to exit; stdout+stderr to `log`; a failure stops the benchmark."""
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {code}); see {log}")
    return seconds


def run_sweep(py: list[str], sweep_yaml: Path, out: Path, env: dict, i: int) -> dict:
    cmd = [*py, "sweep", str(sweep_yaml), "--overwrite", "--quiet"]
    return {"sweep": timed(cmd, out / "logs" / f"sweep_{i}.log", env)}


def run_separate(py: list[str], train_yaml: Path, limits: list, out: Path, env: dict, i: int) -> dict:
    times = {}
    for limit in limits:
        name = f"limit{'all' if limit is None else limit}"
        cmd = [*py, "train", str(train_yaml), f"data.limit={'null' if limit is None else limit}",
               f"output_dir={out / 'separate' / name}", "--overwrite", "--quiet"]
        times[name] = timed(cmd, out / "logs" / f"separate_{name}_{i}.log", env)
    return {"separate": times}


def run_seed_recipe(model_path: str, records: Path, limits: list, epochs: float, real: list,
                    out: Path, env: dict) -> dict:
    """The seed's recipe per trial; trials not in `real` are estimated from the measured ones."""
    measured, estimated = {}, {}
    for limit in [x for x in limits if x in real]:
        name = f"limit{'all' if limit is None else limit}"
        cmd = [sys.executable, str(HERE / "seed_recipe.py"), "--model", model_path, "--data", str(records),
               "--epochs", str(epochs), "--out", str(out / "seed_out" / name)]
        cmd += [] if limit is None else ["--limit", str(limit)]
        log = out / "logs" / f"seed_{name}.log"
        wall = timed(cmd, log, env)
        stats = json.loads([ln for ln in log.read_text().splitlines() if ln.startswith("{")][-1])
        measured[name] = {**stats, "wall_s": round(wall, 2)}
    if not measured:
        sys.exit("--baseline-limits must include at least one of --limits")
    overhead = statistics.median(m["wall_s"] - m["train_s"] for m in measured.values())
    tps = sum(m["tokens"] for m in measured.values()) / sum(m["train_s"] for m in measured.values())
    all_records = json.loads(records.read_text(encoding="utf-8"))
    for limit in [x for x in limits if x not in real]:
        tokens = _seed_tokens(all_records[:limit], epochs)
        name = f"limit{'all' if limit is None else limit}"
        estimated[name] = {"tokens": tokens, "wall_s": round(overhead + tokens / tps, 2)}
    return {"measured": measured, "estimated": estimated, "overhead_s": round(overhead, 2),
            "tokens_per_s": round(tps, 1)}


def _seed_tokens(records: list[dict], epochs: float) -> int:
    """Tokens the seed's recipe trains on: its prompt + answer + pad, cut at 384."""
    from make_records import builtin_tokenizer

    tok = builtin_tokenizer()
    n = 0
    for r in records:
        text = (f"<|im_start|>system\n{r['instruction']}<|im_end|>\n<|im_start|>user\n{r['input']}"
                f"<|im_end|>\n<|im_start|>assistant\n")
        n += min(384, len(tok(text, add_special_tokens=False)["input_ids"])
                 + len(tok(r["output"], add_special_tokens=False)["input_ids"]) + 1)
    return round(n * epochs)


def hardware(device: str) -> str:
    if device == "cuda":
        import torch

        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _sweep_results(sweep_dir: Path) -> dict:
    path = sweep_dir / "sweep.json"
    if not path.is_file():
        return {}
    manifest = json.loads(path.read_text(encoding="utf-8"))
    return {t["name"]: t.get("result") for t in manifest.get("trials", [])}


def _against_seed(args, py, sweep_yaml, model_path, records_path, limits, out, env):
    """(sweep s, the seed recipe's separate processes s, details): one sweep, then the seed's
    script per limit (some measured, the rest estimated)."""
    from loralab.config import ModelConfig
    from loralab.model.load import resolve_model_path

    real = limits if args.baseline_limits is None else [
        None if x.strip() in ("null", "all", "none") else int(x) for x in args.baseline_limits.split(",")]
    sweep_s = run_sweep(py, sweep_yaml, out, env, 0)["sweep"]
    folder = resolve_model_path(ModelConfig(path=model_path))  # the seed script needs a folder
    seed = run_seed_recipe(folder, records_path, limits, args.epochs, real, out, env)
    separate_s = sum(m["wall_s"] for part in ("measured", "estimated") for m in seed[part].values())
    return sweep_s, separate_s, {"seed_recipe": seed, "separate_estimated_trials": sorted(seed["estimated"])}


def _against_separate(args, py, sweep_yaml, train_yaml, limits, out, env):
    """(median sweep s, median separate loralab processes s, rounds): the two sides
    alternate which goes first."""
    rounds = []
    for i in range(args.repeat):
        sides = [(run_sweep, (py, sweep_yaml, out, env, i)),
                 (run_separate, (py, train_yaml, limits, out, env, i))]
        order = sides if i % 2 == 0 else sides[::-1]
        rounds.append({k: v for fn, fn_args in order for k, v in fn(*fn_args).items()})
    sweep_s = statistics.median(r["sweep"] for r in rounds)
    separate_s = statistics.median(sum(r["separate"].values()) for r in rounds)
    return sweep_s, separate_s, {"rounds": rounds}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    limits = [None if x.strip() in ("null", "all", "none") else int(x) for x in args.limits.split(",")]
    n_records = args.records or max(x for x in limits if x is not None)
    sys.path.insert(0, str(HERE))
    from make_records import builtin_tokenizer, length_stats, make_records
    from record import write_run

    from loralab.io import git_commit

    records_path = out / f"records_{n_records}.json"
    if not records_path.is_file():
        tokenizer = builtin_tokenizer()
        records = make_records(n_records, tokenizer, seed=0)
        records_path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
        print("records:", json.dumps(length_stats(records, tokenizer)), flush=True)
    model_path = args.model
    if args.model == "7b-shapes":
        model_path = str(build_7b_shapes(Path(args.model_dir or out.parent / "qwen2.5-7b-shapes")))
    train_yaml, sweep_yaml = write_configs(out, model_path, records_path, limits, args.epochs)
    env = dict(os.environ)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    py = [sys.executable, "-m", "loralab.cli"]

    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    config = {"device": args.device, "model": args.model, "limits": limits, "epochs": args.epochs,
              "records": n_records, "r": 8, "lr": 1e-4, "batch": "4 x grad_accum 4",
              "baseline": args.baseline}
    print("config:", json.dumps(config), "| hardware:", hardware(args.device), "| commit:",
          git_commit(), "| date:", date, flush=True)
    if args.baseline == "seed":
        sweep_s, separate_s, extra = _against_seed(args, py, sweep_yaml, model_path, records_path,
                                                   limits, out, env)
    else:
        sweep_s, separate_s, extra = _against_separate(args, py, sweep_yaml, train_yaml, limits,
                                                       out, env)
    sweep_results = _sweep_results(out / "sweep")
    summary = {"sweep_makespan_s": round(sweep_s, 2), "separate_makespan_s": round(separate_s, 2),
               "ratio": round(separate_s / sweep_s, 3), "device": hardware(args.device), **extra}
    rows = [{"trial": name, **(result or {})} for name, result in sweep_results.items()]
    path = write_run(out, "sweep_makespan", config=config, rows=rows, summary=summary)
    print(json.dumps(summary, indent=2), "\nresult", path)
    print(f"\none sweep process: {sweep_s:.1f} s; separate processes: {separate_s:.1f} s; "
          f"ratio {separate_s / sweep_s:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
