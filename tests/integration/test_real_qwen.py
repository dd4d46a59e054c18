"""Opt-in: a real pretrained Qwen2.5 (0.5B, CPU) through loralab train + loralab eval.

Needs the folder `python bench/real_qwen_cpu.py prepare` builds (~1 min, 1.7 GB on disk);
skipped without it. Run with `pytest -m slow tests/integration/test_real_qwen.py` (~5 min on
2 CPU cores).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "real_qwen_cpu.py"


def _prepared_folder() -> Path | None:
    # Read at collection time: the session fixture later points LORALAB_CACHE at a temp folder.
    spec = importlib.util.spec_from_file_location("real_qwen_cpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.model_dir() if module.is_prepared() else None


MODEL_DIR = _prepared_folder()
EVAL_RECORDS = 4


def _rows(folder: Path) -> list[dict]:
    from loralab.io import read_jsonl

    return read_jsonl(folder / "predictions.jsonl")


def _largest_lora_b(path: Path) -> float:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return max(t.abs().max().item() for k, t in tensors.items() if "lora_B" in k)


@pytest.mark.slow
def test_real_qwen_two_steps_then_eval(tmp_path):
    if MODEL_DIR is None:
        pytest.skip("real Qwen2.5 folder not prepared: run `python bench/real_qwen_cpu.py prepare`")
    from loralab.config import load_config
    from loralab.evaluate.runner import run_eval
    from loralab.io import read_jsonl
    from loralab.train.loop import train_run

    config = BENCH.parents[1] / "configs" / "qwen2.5-7b-instruct.yaml"
    run_dir = tmp_path / "run"
    cfg = load_config(config, [
        f"model.path={MODEL_DIR}", f"output_dir={run_dir}", "tracking.backend=none",
        "data.limit=8", "train.batch_size=4", "train.grad_accum=1", "train.max_steps=2",
        # At the seed's 1e-4, 2 steps of 4 records leave every answer as the base's (a tag
        # name); 10x gives the format a chance to move in a test-sized run.
        "train.lr=1e-3",
    ])
    result = train_run(cfg, show_progress=False)
    assert result["steps"] == 2
    losses = [row["loss"] for row in read_jsonl(run_dir / "metrics.jsonl")]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses)
    assert _largest_lora_b(run_dir / "adapter_model.safetensors") > 0  # B starts at zero

    comp = tmp_path / "comparison"
    run_eval(None, [run_dir], True, EVAL_RECORDS, comp, None, [])
    base, adapter = _rows(comp / "base"), _rows(run_dir / "eval")
    assert len(base) == len(adapter) == EVAL_RECORDS
    assert [r["reference"] for r in base] == [r["reference"] for r in adapter]
    for rows in (base, adapter):  # real text, not padding or an empty loop
        assert all(r["new_tokens"] > 0 and r["generation"].strip() for r in rows)
    metrics = {n: json.loads((f / "metrics.json").read_text()) for n, f in
               (("base", comp / "base"), ("adapter", run_dir / "eval"))}
    # Training on the 9-tag JSON answers with the inference prompt must not make the model
    # answer JSON less often than the base (which, in docs/real_model.md, answers a tag name).
    assert metrics["adapter"]["json_rate"] >= metrics["base"]["json_rate"]
    # The merged adapter must reach generation: some answer differs from the base's.
    assert [r["generation"] for r in adapter] != [r["generation"] for r in base]
    # Part 4's definitions tie the two (range 10); unbounded, since scores may leave 0..10.
    for m in metrics.values():
        assert m["weighted_accuracy"] == pytest.approx(1 - m["weighted_error"] / 10)
