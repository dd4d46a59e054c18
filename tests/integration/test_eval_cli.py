"""`loralab eval` end to end on CPU (tiny model, real tokenizer) and its bad-input errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from loralab.cli import main
from loralab.io import read_json, read_jsonl


@pytest.fixture(scope="module")
def trained_run(train_tiny_run):
    """A 2-step adapter run trained in-process on the shared tiny base."""
    return train_tiny_run("eval", "data.eval_path={small_data}", "eval.max_new_tokens=6", "eval.bootstrap=50")[0]


def _sweep(tmp_path: Path, trials: list[dict]) -> Path:
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"trials": trials}), encoding="utf-8")
    return sweep


def test_eval_sweep_base_references_and_report(trained_run, tmp_path, capsys):
    sweep = _sweep(tmp_path, [
        {"name": "r8", "path": str(trained_run), "status": "done"},
        {"name": "r16", "path": str(tmp_path / "missing"), "status": "failed"},
    ])
    code = main(["eval", "--adapters", str(sweep), "--base", "--limit", "3"])
    assert code == 0
    out = capsys.readouterr().out
    comp = sweep / "comparison"
    metrics = read_json(trained_run / "eval" / "metrics.json")
    assert metrics["kind"] == "adapter" and metrics["target"] == "r8" and metrics["n"] == 3
    assert metrics["hyperparams"]["lora.r"] == 8
    assert metrics["gen"]["max_new_tokens"] == 6 and metrics["gen"]["new_tokens"] > 0
    # the adapter went in as tensors through loralab's own forward, not through PEFT
    assert metrics["adapter_weights"] == "folded into loralab's forward"
    assert metrics["gen"]["fast_forward"] is True
    assert set(metrics["ci"]) >= {"weighted_accuracy", "f1"}
    rows = read_jsonl(trained_run / "eval" / "predictions.jsonl")
    assert len(rows) == 3 and {"input", "reference", "generation", "finished", "parsed"} <= set(rows[0])
    assert all(r["new_tokens"] <= 6 for r in rows)
    base = read_json(comp / "base" / "metrics.json")
    assert base["kind"] == "base" and base["n"] == 3
    refs = {p.name for p in (comp / "references").iterdir()}
    assert refs == {"empty", "all_zeros", "train_mean", "train_median"}
    targets = read_json(comp / "targets.json")["targets"]
    assert len(targets) == 6
    for name in ("comparison.csv", "comparison.md", "report.html"):
        assert (comp / name).is_file()
    assert "r8" in out and "all_zeros" in out


def test_eval_bad_file_format(trained_run, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"text": "not a record list"}\n', encoding="utf-8")
    assert main(["eval", "--adapters", str(trained_run), "--data", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.json" in err


def test_eval_reference_that_is_not_tag_json(trained_run, tmp_path, capsys):
    bad = tmp_path / "bad_refs.json"
    bad.write_text(json.dumps([{"instruction": "s", "input": "x", "output": "plain text"}]),
                   encoding="utf-8")
    assert main(["eval", "--adapters", str(trained_run), "--data", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "record 1" in err and "JSON object" in err


def test_eval_adapters_of_another_base(trained_run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(trained_run, other, ignore=shutil.ignore_patterns("eval", "checkpoints"))
    text = (other / "config.yaml").read_text(encoding="utf-8")
    (other / "config.yaml").write_text(
        text.replace("builtin:tiny-qwen2", "Qwen/Qwen2.5-7B-Instruct"), encoding="utf-8")
    assert main(["eval", "--adapters", str(trained_run), str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "Qwen/Qwen2.5-7B-Instruct" in err and "builtin:tiny-qwen2" in err


def test_eval_sweep_without_finished_trials(tmp_path, capsys):
    sweep = _sweep(tmp_path, [{"name": "a", "path": "a", "status": "failed"},
                              {"name": "b", "path": "b", "status": "running"}])
    assert main(["eval", "--adapters", str(sweep)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no finished trial" in err


def test_eval_missing_adapter_dir(tmp_path, capsys):
    assert main(["eval", "--adapters", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not found" in err and "nope" in err


def test_eval_needs_something_to_evaluate(capsys):
    assert main(["eval"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_adapters_sharing_a_batch_match_one_at_a_time(trained_run, tmp_path):
    """Two adapters generated in one batch (eval.adapter_batch) give the same predictions as
    each evaluated alone; the second adapter is the first with B scaled, so outputs differ.
    In float32 (model.dtype=fp32, also on a GPU): in bf16 the unmerged and folded arithmetic
    round differently and a random tiny model's near-tie tokens flip (seen on an H200)."""
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(trained_run, other, ignore=shutil.ignore_patterns("eval"))
    weights = other / "adapter_model.safetensors"
    tensors = {k: v * 40 if "lora_B" in k else v for k, v in load_file(weights).items()}
    save_file(tensors, weights)
    runs = [str(trained_run), str(other)]
    texts = {}
    for size in (2, 1):
        out = tmp_path / f"comp{size}"
        assert main(["eval", "--adapters", *runs, "--limit", "3", "--out", str(out),
                     f"eval.adapter_batch={size}", "eval.max_new_tokens=8",
                     "model.dtype=fp32"]) == 0
        for run in (trained_run, other):
            how = read_json(run / "eval" / "metrics.json")["adapter_weights"]
            assert how.endswith("2 adapters per batch") if size == 2 else how.startswith("folded")
            texts[size, run.name] = [r["generation"] for r in read_jsonl(
                run / "eval" / "predictions.jsonl")]
    assert texts[2, "run"] == texts[1, "run"] and texts[2, "other"] == texts[1, "other"]
    assert texts[1, "run"] != texts[1, "other"]


def test_adapters_that_do_not_fit_one_batch_go_one_at_a_time(trained_run, tmp_path, capsys,
                                                             monkeypatch):
    import torch

    from loralab.engine import api

    real_generate = api.generate

    def out_of_memory(model, tokenizer, prompts, settings, adapters=None, **kwargs):
        if isinstance(adapters, list):  # K adapters sharing a batch: simulate no room
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_generate(model, tokenizer, prompts, settings, adapters, **kwargs)

    monkeypatch.setattr(api, "generate", out_of_memory)
    other = tmp_path / "other"
    shutil.copytree(trained_run, other, ignore=shutil.ignore_patterns("eval"))
    assert main(["eval", "--adapters", str(trained_run), str(other), "--limit", "2",
                 "--out", str(tmp_path / "comp"), "eval.max_new_tokens=4"]) == 0
    assert "ran out of GPU memory: evaluating them one at a time" in capsys.readouterr().out
    for run in (trained_run, other):
        metrics = read_json(run / "eval" / "metrics.json")
        assert metrics["adapter_weights"] == "folded into loralab's forward" and metrics["n"] == 2

