"""Packed vs sequential sweeps on one GPU: the same LoRA trials over one frozen base.

Random-weight models of Qwen2.5-0.5B, 1.5B and 7B shapes (bf16), synthetic seed-like records
(lengths 150-384, last 25% labelled), effective batch 16 per trial, r in {4, 8, 16, 32} x
lr in {1e-4, 2e-4} (8 trials), every trial `--steps` optimizer steps (max_steps):
  sequential  loralab's sweep path: one base, `train_adapter` per trial (levers as the loop
              resolves them, compiled layers reused across trials); per-trial wall times, so
              the first trial's start-up (compilation) and the later trials' can be compared
  packed      `sweep.packed.run_packed`: every trial in one forward/backward per step
The sequential side trains the first 4 (0.5B) or 3 (1.5B, 7B) trials and counts the others at
the median of its trials from the third on (by then the rank is a dynamic dimension: nothing
left to compile); `--seq-trials 0.5b=8` trains them all. Then on 0.5B shapes the packed time
for 2, 4 and 16 trials (8 is the main row); the sequential time for those counts is the first
two trials as measured + (N-2) x that steady median (rows say "estimated").

    python bench/packed_sweep.py --out $OUT                 # one H200, ~8 min: 0.5B and 1.5B
    python bench/packed_sweep.py --out $OUT --shapes 7b     # one H200, ~5 min: 7B
    python bench/packed_sweep.py --out /tmp/x --smoke       # CPU, tiny model, < 1 minute

Steps (default): 0.5B 20, 1.5B 12, 7B 6 per trial (times include each side's compilation,
as a sweep's would: that start-up is what packing saves). The run's file:
$OUT/packed_sweep/<date>_<commit>_<gpu>.json (bench/record.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SEVEN_B, NoTokenizer, build_model, loralab_cfg, seed_like_examples  # noqa: E402
from record import write_run  # noqa: E402

QWEN_SMALL = dict(vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, use_cache=False,
                  bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
SHAPES = {
    "0.5b": dict(QWEN_SMALL, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2),
    "1.5b": dict(QWEN_SMALL, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2),
    "7b": SEVEN_B,
}
STEPS = {"0.5b": 20, "1.5b": 12, "7b": 6}
SEQ_TRIALS = {"0.5b": 4, "1.5b": 3, "7b": 3}  # sequential trials trained (the rest counted)
RANKS, LRS = (4, 8, 16, 32), (1e-4, 2e-4, 3e-4, 4e-4)
LOG: list[str] = []


def say(*parts) -> None:
    line = " ".join(str(p) for p in parts)
    LOG.append(line)
    print(line, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the result file (and trial runs)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, 2 steps: a test")
    p.add_argument("--shapes", default="0.5b,1.5b",
                   help="comma list of 0.5b, 1.5b, 7b (7b: a second run, ~5 min)")
    p.add_argument("--steps", default=None, help="e.g. 0.5b=40,1.5b=25,7b=10 (steps per trial)")
    p.add_argument("--counts", default="2,4,16",
                   help="more trial counts for the 0.5B ratio curve (--trials is measured anyway)")
    p.add_argument("--seq-trials", dest="seq_trials_text", default=None,
                   help="sequential trials trained per shape, e.g. 0.5b=8 (default 0.5b=4,1.5b=3,7b=3)")
    p.add_argument("--trials", type=int, default=8, help="trials in the main comparison")
    p.add_argument("--static-ranks", action="store_true",
                   help="sequential without compile reuse (dynamo's static parameter shapes)")
    p.add_argument("--commit", default=None, help="loralab's commit (the GPU copy has no .git)")
    return p.parse_args(argv)


def make_trials(root: Path, count: int, steps: int, smoke: bool) -> list:
    """r x lr trials (ranks fastest), each a full validated loralab config."""
    from loralab.sweep.spec import Trial

    trials = []
    for i in range(count):
        r, lr = RANKS[i % len(RANKS)], LRS[(i // len(RANKS)) % len(LRS)]
        name = f"r{r}_lr{lr:g}" + (f"_{i}" if i >= len(RANKS) * len(LRS) else "")
        overrides = {"lora.r": r, "train.lr": lr, "lora.alpha": 32}
        if smoke:
            overrides |= {"train.batch_size": 2, "train.grad_accum": 2, "data.max_length": 64,
                          "lora.target_modules": ["q_proj", "v_proj"]}
        cfg = loralab_cfg(root / name, steps, overrides)
        trials.append(Trial(name, overrides, cfg))
    return trials


def run_sequential(trials: list, base, data, reuse: bool = True) -> list[float]:
    """Each trial as the sweep's in-process path trains it (compiled code reused across ranks
    unless `reuse` is False: dynamo's default); wall seconds per trial."""
    import contextlib

    from loralab.sweep.runner import compiled_code_reused

    with compiled_code_reused() if reuse else contextlib.nullcontext():
        return _one_by_one(trials, base, data)


def _one_by_one(trials: list, base, data) -> list[float]:
    from loralab.train.loop import train_adapter

    times = []
    for trial in trials:
        _sync()
        t0 = time.perf_counter()
        peft_model, result = train_adapter(trial.config, base, data=data, overwrite=True,
                                           show_progress=False)
        peft_model.unload()
        _sync()
        times.append(time.perf_counter() - t0)
        say(f"  sequential {trial.name}: {times[-1]:.1f} s, loss {result['final_loss']:.4f}, "
            f"fast path {result['fast_path'].get('micro_batch')}x{result['fast_path'].get('grad_accum')}")
    return times


def run_packed_once(trials: list, base, data) -> tuple[float, dict]:
    from loralab.sweep.packed import run_packed

    statuses: dict[str, str] = {}

    def report(name: str, status: str, fields: dict) -> None:
        statuses[name] = status if status != "failed" else f"failed: {fields.get('error')}"

    from loralab.sweep.runner import compiled_code_reused

    _sync()
    t0 = time.perf_counter()
    with compiled_code_reused():  # as the sweep runs it
        run_packed(trials, base, report, show_progress=False, data={t.name: data for t in trials})
    _sync()
    return time.perf_counter() - t0, statuses


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def load(shape_name: str, smoke: bool):
    import torch

    from loralab.train.loop import Base

    if smoke:
        from transformers import AutoModelForCausalLM, Qwen2Config

        from loralab.model.load import TINY_QWEN2

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(Qwen2Config(**TINY_QWEN2)).requires_grad_(False)
        return Base(model.eval(), NoTokenizer(), torch.device("cpu"))
    return Base(build_model(SHAPES[shape_name]), NoTokenizer(), torch.device("cuda", 0))


def compare(shape_name: str, args, steps: int, rows: list, root: Path) -> dict:
    """Sequential vs packed for `args.trials` trials on one shape; one row. The sequential side
    trains the first `seq_trials` of them; the rest, if any, are counted at the median of the
    measured trials from the third on (the rank is dynamic by then: no more compilation)."""
    import torch

    base = load(shape_name, args.smoke)
    n = steps * 16 if not args.smoke else 16
    examples = seed_like_examples(n, low=40 if args.smoke else 150, high=64 if args.smoke else 384)
    data = (examples, {"kept": len(examples)})
    trials = make_trials(root / f"{shape_name}-seq", args.trials, steps, args.smoke)
    k = min(args.trials, args.seq_trials.get(shape_name, args.trials))
    say(f"{shape_name}: {args.trials} trials x {steps} steps, effective batch 16 each "
        f"(sequential: {k} trained, {args.trials - k} counted at the steady trials' median)")
    seq = run_sequential(trials[:k], base, data, reuse=not args.static_ranks)
    steady = statistics.median(seq[2:] or seq[-1:])
    sequential = sum(seq) + (args.trials - k) * steady
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trials = make_trials(root / f"{shape_name}-packed", args.trials, steps, args.smoke)
    packed, statuses = run_packed_once(trials, base, data)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    row = {"shape": shape_name, "trials": args.trials, "steps_per_trial": steps,
           "sequential_s": round(sequential, 2), "sequential_trained": k,
           "sequential_per_trial_s": [round(t, 2) for t in seq],
           "steady_trial_s": round(steady, 2), "packed_s": round(packed, 2),
           "ratio": round(packed / sequential, 3),
           "packed_peak_gib": round(peak, 2) if peak else None, "packed_statuses": statuses}
    say(f"{shape_name}: sequential {sequential:.1f} s (per trial {row['sequential_per_trial_s']}), "
        f"packed {packed:.1f} s -> ratio {row['ratio']}")
    rows.append(row)
    return {"base": base, "data": data, "seq": seq, "steady": steady}


def ratio_curve(args, steps: int, rows: list, root: Path, measured: dict) -> None:
    """Packed time for other trial counts on 0.5B; the sequential side from the measured
    trials (the first two as measured, the others at the steady median)."""
    first_two = sum(measured["seq"][:2])
    for count in [int(c) for c in args.counts.split(",") if c]:
        trials = make_trials(root / f"count{count}", count, steps, args.smoke)
        packed, statuses = run_packed_once(trials, measured["base"], measured["data"])
        sequential = (sum(measured["seq"][:count]) if count <= 2
                      else first_two + (count - 2) * measured["steady"])
        row = {"shape": "0.5b" if not args.smoke else "tiny", "trials": count,
               "steps_per_trial": steps, "packed_s": round(packed, 2),
               "sequential_s_estimated": round(sequential, 2),
               "ratio": round(packed / sequential, 3), "packed_statuses": statuses}
        say(f"  {count} trials: packed {packed:.1f} s, sequential (est.) {sequential:.1f} s "
            f"-> ratio {row['ratio']}")
        rows.append(row)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    steps = dict(STEPS)
    for item in (args.steps or "").split(","):
        if item:
            key, value = item.split("=")
            steps[key] = int(value)
    shapes = ["0.5b"] if args.smoke else [s for s in args.shapes.split(",") if s]
    args.seq_trials = dict(SEQ_TRIALS)
    for item in (args.seq_trials_text or "").split(","):
        if item:
            key, value = item.split("=")
            args.seq_trials[key] = int(value)
    if args.smoke:
        steps = {"0.5b": 2}
        args.counts = "2,3"
        args.trials = min(args.trials, 3)
    root = Path(tempfile.mkdtemp(prefix="packed_sweep_"))
    rows: list[dict] = []
    config = {"shapes": {s: SHAPES[s] for s in shapes} if not args.smoke else "tiny",
              "steps_per_trial": {s: steps[s] for s in shapes}, "effective_batch": 16,
              "ranks": RANKS, "lrs": LRS[:2], "smoke": args.smoke,
              "compile_reuse": not args.static_ranks, "data": "seed_like_examples",
              "sequential_trials_trained": {s: args.seq_trials.get(s) for s in shapes}}
    t0 = time.time()
    for shape in shapes:
        measured = compare(shape, args, steps[shape], rows, root)
        if shape == "0.5b":
            ratio_curve(args, steps[shape], rows, root, measured)
        del measured
        path = write_run(out, "packed_sweep", config=config, rows=rows, commit=args.commit,
                         summary={"log": LOG, "seconds": round(time.time() - t0, 1)})
    say(f"written {path} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
