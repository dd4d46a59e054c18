"""Early stopping on the held-out loss keeps the best eval's adapter; a finished run is not resumed."""

from __future__ import annotations

import json

import pytest
import torch

from loralab.cli import main
from loralab.commands.train import demo_config_path

DATA_DIR = demo_config_path().parents[1] / "data"


def _held_out_loss_in_plain_peft(run_dir, eval_path) -> float:
    """Mean token loss of the saved adapter on the eval file, through plain HF + PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loralab.config import load_config
    from loralab.data.summary import build_dataset
    from loralab.model.tokenizer import load_tokenizer

    cfg = load_config(run_dir / "config.yaml")
    examples, _ = build_dataset(cfg.data, load_tokenizer(str(run_dir)), cfg.train.seed,
                                path=str(eval_path), select=False)
    adapter = json.loads((run_dir / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(adapter["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, str(run_dir)).eval()
    total = count = 0.0
    with torch.no_grad():
        for e in examples:
            n = sum(1 for x in e.labels[1:] if x != -100)
            out = model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels]))
            total, count = total + float(out.loss) * n, count + n
    return total / count


def test_early_stopping_keeps_the_best_adapter(tmp_path, small_data, monkeypatch):
    import loralab.train.loop as loop

    real_losses = []

    def worse_after_the_third_eval(*args, **kwargs):
        # The real held-out loss, plus 1.0 from the fourth eval on: the tiny random model's
        # own trajectory depends on transformers' initialisation (with 5.24 it improves to the
        # last step), so the rise that early stopping must catch is made certain here.
        loss = held_out_loss(*args, **kwargs)
        real_losses.append(loss)
        return loss + (1.0 if len(real_losses) > 3 else 0.0)

    held_out_loss = loop.held_out_loss
    monkeypatch.setattr(loop, "held_out_loss", worse_after_the_third_eval)
    run = tmp_path / "run"
    args = ["train", str(demo_config_path()), f"data.path={DATA_DIR / 'tag_scores_train.json'}",
            "data.limit=16", f"data.eval_path={small_data}", "train.eval_every=1",
            "train.early_stopping_patience=2", "train.max_steps=12", "train.lr=0.3",
            "train.batch_size=4", "train.grad_accum=1", "data.max_length=256",
            "tracking.backend=none", f"output_dir={run}", "--quiet"]
    assert main(args) == 0
    result = json.loads((run / "result.json").read_text())
    evals = [(r["step"], r["eval_loss"]) for r in map(json.loads, (run / "metrics.jsonl").open())]
    best_step, best = min(evals, key=lambda x: x[1])
    assert result["stopped_early"] and result["steps"] < 12
    assert best_step <= 3 and best == min(real_losses[:3])
    assert result["steps"] == best_step + 2  # two evals without a better loss
    assert (result["best_step"], result["best_eval_loss"]) == (best_step, best)
    assert result["eval_loss"] == evals[-1][1] != best
    # The saved adapter is the best eval's, not the last step's.
    assert _held_out_loss_in_plain_peft(run, small_data) == pytest.approx(best, rel=1e-4)

    assert main([*args[:-1], "--resume"]) == 2  # finished: nothing to resume


def test_early_stopping_needs_a_held_out_loss(tmp_path, capsys):
    code = main(["train", str(demo_config_path()), "train.early_stopping_patience=2",
                 f"output_dir={tmp_path / 'run'}", "--dry-run"])
    assert code == 2
    assert "train.eval_every" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
