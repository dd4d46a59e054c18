"""`loralab merge`, `loralab predict` and `loralab chat` on a tiny trained run (CPU)."""

from __future__ import annotations

import io
import json

import pytest

from loralab.cli import main
from loralab.io import read_json, read_jsonl


@pytest.fixture(scope="module")
def trained_run(train_tiny_run):
    return train_tiny_run("merge", "eval.max_new_tokens=5")[0]


def test_merge_writes_a_loadable_model_that_matches_base_plus_adapter(trained_run, tmp_path,
                                                                      capsys):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(trained_run), "--out", str(out)]) == 0
    assert "largest logit difference" in capsys.readouterr().out
    check = read_json(out / "merge_check.json")
    assert check["prompts"] == 3 and check["max_abs_logit_diff"] < 1e-3
    assert (out / "tokenizer_config.json").is_file() and (out / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    # The adapter changed the weights: the merged model is not the base.
    from loralab.model.load import builtin_model_dir

    base = load_file(str(builtin_model_dir("tiny-qwen2") / "model.safetensors"))
    merged = model.state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base[key], merged[key])
    assert not any(name.startswith(".merged") for name in map(str, tmp_path.iterdir()))


def test_merge_refuses_a_non_empty_out_unless_overwrite(trained_run, tmp_path, capsys):
    taken = tmp_path / "taken"  # a folder loralab did not write: refused even with --overwrite
    taken.mkdir()
    (taken / "keep.txt").write_text("x", encoding="utf-8")
    for extra in ([], ["--overwrite"]):
        assert main(["merge", "--adapter", str(trained_run), "--out", str(taken), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "not a merged model" in err
    assert (taken / "keep.txt").is_file()
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(trained_run), "--out", str(out)]) == 0
    assert main(["merge", "--adapter", str(trained_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--overwrite" in err.splitlines()[-1]
    assert main(["merge", "--adapter", str(trained_run), "--out", str(out), "--overwrite"]) == 0
    assert (out / "merge_check.json").is_file()


def test_merge_missing_adapter(tmp_path, capsys):
    assert main(["merge", "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err


def test_predict_to_jsonl(trained_run, tmp_path, small_data):
    out = tmp_path / "preds.jsonl"
    assert main(["predict", "--adapter", str(trained_run), "--input", str(small_data),
                 "--limit", "3", "--out", str(out)]) == 0
    rows = read_jsonl(out)
    assert len(rows) == 3
    assert {"input", "generation", "parsed", "finished"} <= set(rows[0])
    records = json.loads(small_data.read_text(encoding="utf-8"))
    assert [r["input"] for r in rows] == [r["input"] for r in records[:3]]
    assert all(r["new_tokens"] <= 5 for r in rows)


def test_predict_accepts_plain_strings(trained_run, tmp_path, capsys):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('"first article"\n{"input": "second"}\n', encoding="utf-8")
    assert main(["predict", "--adapter", str(trained_run), "--input", str(inputs)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["input"] for r in rows] == ["first article", "second"]


def test_predict_bad_input_file(trained_run, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n", encoding="utf-8")
    assert main(["predict", "--adapter", str(trained_run), "--input", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.jsonl" in err


def test_chat_streams_answers_until_exit(trained_run, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\nsecond turn\nexit\nnot read\n"))
    assert main(["chat", "--adapter", str(trained_run), "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert "exit" in captured.err  # the banner says how to leave
    assert captured.out.count("assistant> ") == 2  # one answer per user turn, none after exit


def test_chat_ends_on_eof(trained_run, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", "--adapter", str(trained_run), "--max-new-tokens", "3",
                 "--system", "be brief"]) == 0
    assert capsys.readouterr().out.count("assistant> ") == 1
