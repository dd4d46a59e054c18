"""Training throughput on one GPU, side by side: the seed's recipe, HF+PEFT+Liger, loralab.

Qwen2.5-7B shapes with random bf16 weights, r=8 on the 7 projections, lengths uniform 150-384
with the last 25% labelled, effective batch 16. Systems, all in one process and one GPU run:
  (a) seed     HF Trainer + PEFT, bs 4 x GA 4, gradient checkpointing, dropout 0.1
  (b) liger    HF Trainer + PEFT + Liger kernels, no checkpointing, bs 16 and bs 64 (its best)
  (c) loralab  loralab's train loop, its defaults (dropout 0.1 as the seed)
  (d) loralab with one lever switched off at a time, and with checkpointing forced on
plus the same-math check: 30 steps of plain HF+PEFT vs loralab (dropout 0, same data order),
and the trained adapter reloaded in plain PEFT (logits compared in bf16).

    python bench/train_speed.py --out $OUT            # full run (< 9 minutes on an H200)
    python bench/train_speed.py --out /tmp/x --quick  # fewer steps: a smoke test

Each loralab row also records what `loralab estimate` predicts for its config on this card
(`estimate.training_plan`, the function estimate prints; "estimate GiB", "est. error") and
the data's worst case. The run's file: $OUT/train_speed/<date>_<commit>_<gpu>.json (bench/record.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PAD_ID,
    SEVEN_B,
    TARGETS,
    NoTokenizer,
    build_model,
    loralab_cfg,
    markdown_table,
    median,
    mfu,
    seed_like_examples,
)
from record import write_run  # noqa: E402

VARIANTS = [  # (name, overrides): each switches one lever off
    ("loralab, dropout 0", {"lora.dropout": 0.0}),
    ("- packing (padded rows)", {"train.packing": "off"}),
    ("- fused LoRA (PEFT forward)", {"train.fused_lora": "off"}),
    ("- torch.compile", {"train.compile": "off"}),
    ("- memory auto (bs 4 x GA 4)", {"train.memory": "fixed"}),
    ("- labelled-only logits", {"train.labelled_logits": False}),
    ("+ checkpointing on, bs 4 x GA 4", {"train.memory": "fixed",
                                        "train.gradient_checkpointing": "on"}),
]
LOG: list[str] = []


def say(*parts) -> None:
    line = " ".join(str(p) for p in parts)
    LOG.append(line)
    print(line, flush=True)


def run_loralab(name, model, examples, steps, warm, overrides, params) -> dict:
    import torch

    from loralab import layout
    from loralab.train.loop import Base, train_adapter

    cfg = loralab_cfg(Path(tempfile.mkdtemp(prefix="ll_")), steps, overrides)
    base = Base(model, NoTokenizer(), torch.device("cuda"))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    try:
        peft_model, result = train_adapter(cfg, base, data=(examples, {"kept": len(examples)}),
                                           overwrite=True, show_progress=False)
    except Exception as exc:  # report and go on: one broken lever must not lose the run
        say(f"{name}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
        return {"system": name, "error": repr(exc)[:300]}
    peft_model.unload()
    metrics = layout.RunDir(cfg.output_dir).step_metrics
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    tps = median([r["tokens_per_s"] for r in rows[warm:]])
    fast = result["fast_path"]
    row = {"system": name, "tokens_per_s": tps, "mfu": mfu(tps, params),
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
           "predicted_gib": result.get("predicted_peak_gb"),
           "micro_batch": fast["micro_batch"], "grad_accum": fast["grad_accum"],
           "checkpointing": fast["checkpointing"], "attention": fast["attention"],
           "wall_s": time.time() - t0, "losses": [r["loss"] for r in rows],
           "step_tokens_per_s": [round(r["tokens_per_s"]) for r in rows], "fast_path": fast,
           **estimate_of(cfg, model, examples)}
    # The plan estimate printed is the one training made (same micro-batch and checkpointing).
    row["estimate_plan_agrees"] = (row["estimate_micro_batch"], row["estimate_checkpointing"]) \
        == (fast["micro_batch"], fast["checkpointing"])
    say(json.dumps({k: v for k, v in row.items() if k not in ("losses", "fast_path")}))
    return row


def estimate_of(cfg, model, examples) -> dict:
    """What `loralab estimate` prints for this config on this card (the same function), from
    config.json's shapes and the data's lengths only: to set beside the measured peak."""
    import torch

    from loralab.model.memory import shape_of
    from loralab.train.estimate import training_plan

    lengths = [len(e.input_ids) for e in examples]
    labelled = [sum(1 for x in e.labels[1:] if x != -100) for e in examples]
    card_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    plan = training_plan(cfg, shape_of(model.config), lengths, labelled, card_gib)
    return {"estimate_gib": plan.predicted_gib["total"], "estimate_worst_gib": plan.worst_case_gib,
            "estimate_micro_batch": plan.micro_batch, "estimate_checkpointing": plan.checkpointing}


def run_trainer(name, model, examples, bs, ga, gc, dropout, steps, warm, params, liger=False):
    """The seed's recipe (and the Liger anchor) through HF Trainer, as anchors/gpu_probe.py."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Timer(TrainerCallback):
        def __init__(self):
            self.t = []

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.t.append(time.time())

    data = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]

    def collate(feats):
        width = max(len(f["input_ids"]) for f in feats)
        pad = [width - len(f["input_ids"]) for f in feats]
        rows = list(zip(feats, pad, strict=True))
        return {"input_ids": torch.tensor([f["input_ids"] + [PAD_ID] * p for f, p in rows]),
                "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * p
                                                for f, p in rows]),
                "labels": torch.tensor([f["labels"] + [-100] * p for f, p in rows])}

    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=32,
                                                  lora_dropout=dropout, target_modules=TARGETS))
    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="hf_"),
                             per_device_train_batch_size=bs, gradient_accumulation_steps=ga, logging_steps=1, max_steps=steps,
                             learning_rate=1e-4, gradient_checkpointing=gc, save_strategy="no",
                             report_to=[], bf16=True, dataloader_num_workers=0, disable_tqdm=True)
    timer = Timer()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        Trainer(model=peft_model, args=args, train_dataset=data, data_collator=collate,
                callbacks=[timer]).train()
    except Exception as exc:
        say(f"{name}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
        return {"system": name, "error": repr(exc)[:300]}
    finally:
        peft_model.unload()
        if gc:
            model.gradient_checkpointing_disable()
        model.disable_input_require_grads()
        model.eval()
    mean_len = sum(len(e.input_ids) for e in examples) / len(examples)
    steps_s = [b - a for a, b in zip(timer.t[warm - 1:-1], timer.t[warm:], strict=True)]
    tps = bs * ga * mean_len / median(steps_s)
    # loralab's memory model covers the plain HF+PEFT path, not Liger's kernels.
    predicted = None if liger else seed_prediction(model, bs, gc, dropout)
    row = {"system": name, "tokens_per_s": tps, "mfu": mfu(tps, params),
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "micro_batch": bs,
           "grad_accum": ga, "checkpointing": gc, "predicted_gib": predicted}
    say(json.dumps(row))
    return row


def seed_prediction(model, bs, gc, dropout) -> float:
    """loralab's memory model for an HF+PEFT padded step (PEFT forward, SDPA, HF's loss)."""
    from loralab.model.memory import StepShape, estimate, shape_of

    shape = shape_of(model.config, sum(p.numel() for p in model.parameters()))
    step = StepShape(fused_lora=False, dropout=dropout, varlen_attention=False,
                     labelled_only=False, loss_chunk=10**9)
    est = estimate(shape, tokens=bs * 384, labelled=bs * 96, micro_batch=bs, checkpointing=gc,
                   step=step)
    return est.total / 2**30


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--skip", default="", help="comma list of: seed,liger,variants,equiv")
    args = ap.parse_args()
    out = Path(args.out)
    skip = set(filter(None, args.skip.split(",")))
    import torch
    from equivalence import probe_kernels, same_math  # bench/equivalence.py

    # --commit: the GPU machine's copy of the tree may have no git history.
    config = {"commit_given": args.commit, "kernels": probe_kernels()}
    say("kernels", json.dumps(config["kernels"]))
    model = build_model(SEVEN_B)
    params = sum(p.numel() for p in model.parameters())
    examples = seed_like_examples(2000)
    steps, warm = (7, 3) if args.quick else (12, 4)
    config.update(model="Qwen2.5-7B shapes, random bf16 weights", params=params, lora_r=8,
                  lora_alpha=32, targets=TARGETS, examples=len(examples),
                  lengths="uniform 150-384, last 25% labelled", effective_batch=16, steps=steps,
                  untimed_warmup_steps=warm)
    say("config", json.dumps(config))
    rows = []
    if "seed" not in skip:
        rows.append(run_trainer("(a) seed: HF Trainer bs4xGA4, ckpt, dropout 0.1", model, examples,
                                4, 4, True, 0.1, 6 if args.quick else 8, 2, params))
    rows.append(run_loralab("(c) loralab defaults", model, examples, steps, warm, {}, params))
    report(out, config, rows, None)
    math = None if "equiv" in skip else same_math(model, examples, 8 if args.quick else 30, say)
    report(out, config, rows, math)
    for name, overrides in [] if "variants" in skip else VARIANTS:
        rows.append(run_loralab(name, model, examples, steps, warm, overrides, params))
        report(out, config, rows, math, quiet=True)
    if "liger" not in skip:
        # Trainer never turns checkpointing off again: the anchors' later "no checkpointing"
        # rows ran with it on. run_trainer switches it off after each run.
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)  # patches the base: Liger runs come last
        rows.append(run_trainer("(b) HF+PEFT+Liger bs16, no ckpt", model, examples, 16, 1, False,
                                0.1, 5 if args.quick else 8, 2, params, liger=True))
        if not args.quick:
            rows.append(run_trainer("(b) HF+PEFT+Liger bs32, no ckpt", model, examples, 32, 1,
                                    False, 0.1, 6, 2, params, liger=True))
    report(out, config, rows, math)
    del torch
    return 0


def report(out: Path, config: dict, rows: list[dict], math: dict | None, quiet=False) -> None:
    """Table, log and the run's result file under `out` (rewritten after every system: a
    timeout keeps what was measured)."""
    ok = [r for r in rows if "error" not in r]
    ref_a = next((r["tokens_per_s"] for r in ok if r["system"].startswith("(a)")), None)
    ref_b = max((r["tokens_per_s"] for r in ok if r["system"].startswith("(b)")), default=None)
    for r in ok:
        r["vs_a"] = r["tokens_per_s"] / ref_a if ref_a else None
        r["vs_b"] = r["tokens_per_s"] / ref_b if ref_b else None
        r["pred_err"] = _error(r.get("predicted_gib"), r["peak_gib"])
        r["est_err"] = _error(r.get("estimate_gib"), r["peak_gib"])
    cols = [("system", "system"), ("tokens_per_s", "real tokens/s"), ("mfu", "MFU"),
            ("vs_a", "× (a)"), ("vs_b", "× best (b)"), ("peak_gib", "peak GiB"),
            ("predicted_gib", "predicted GiB"), ("pred_err", "pred. error"),
            ("estimate_gib", "estimate GiB"), ("est_err", "est. error"),
            ("estimate_worst_gib", "worst case GiB"),
            ("micro_batch", "micro"), ("grad_accum", "GA"), ("checkpointing", "ckpt")]
    table = markdown_table(ok, cols)
    write_run(out, "train_speed", config=config, rows=rows, summary={"same_math": math},
              commit=config["commit_given"])
    if not quiet:
        say("\n" + table)
    if math and not quiet:
        say("same math:", json.dumps({k: v for k, v in math.items() if k != "losses"}))
    (out / "train_speed.log").write_text("\n".join(LOG) + "\n")
    (out / "train_speed.md").write_text(table + "\n")


def _error(predicted: float | None, measured: float) -> str | None:
    """Signed: + when the prediction is above the measured peak."""
    return f"{100 * (predicted - measured) / measured:+.0f}%" if predicted else None

if __name__ == "__main__":
    sys.exit(main())
