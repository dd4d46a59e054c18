"""build_dataset: read, re-prompt, select, encode, and a truthful summary."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from loralab.config import DataConfig
from loralab.data.render import IGNORE_INDEX, render_prompt
from loralab.data.summary import build_dataset, percentile, print_summary
from loralab.errors import UserError


def test_seed_like_dataset_summary(qwen_tokenizer, seed_like_file):
    path = seed_like_file(n=12, input_chars=700)
    cfg = DataConfig(path=str(path), max_length=256)
    examples, summary = build_dataset(cfg, qwen_tokenizer, seed=0)
    assert summary["records"] == summary["selected"] == summary["kept"] == 12
    assert summary["skipped"] == 0 and summary["skipped_reasons"] == {}
    assert summary["truncated"] == sum(1 for e in examples if e.truncated) > 0
    assert summary["truncated_tokens"] == sum(e.truncated for e in examples)
    lengths = sorted(len(e.input_ids) for e in examples)
    assert summary["tokens"]["max"] == lengths[-1] <= 256
    assert summary["tokens"]["min"] == lengths[0]
    assert lengths[0] <= summary["tokens"]["p10"] <= summary["tokens"]["p50"] <= summary["tokens"]["p90"]
    labelled = [sum(t != IGNORE_INDEX for t in e.labels) for e in examples]
    assert summary["labelled_tokens"] == sum(labelled)
    assert summary["answer_tokens"]["max"] == max(labelled)
    assert summary["path"] == str(path)


def test_system_prompt_and_limit_are_applied(qwen_tokenizer, seed_like_file):
    cfg = DataConfig(path=str(seed_like_file(n=10)), system_prompt="LONG", limit=3)
    examples, summary = build_dataset(cfg, qwen_tokenizer, seed=0)
    assert (summary["records"], summary["selected"], summary["kept"]) == (10, 3, 3)
    assert [e.record_index for e in examples] == [1, 2, 3]
    first = examples[0]
    ids = [t for t, lab in zip(first.input_ids, first.labels, strict=True) if lab == IGNORE_INDEX]
    prompt = qwen_tokenizer.decode(ids)
    assert prompt.startswith("<|im_start|>system\nLONG<|im_end|>")
    assert "将以下文本分类" not in prompt


def test_explicit_path_without_selection(qwen_tokenizer, seed_like_file):
    cfg = DataConfig(path="unused.json", sample=2)
    examples, summary = build_dataset(cfg, qwen_tokenizer, seed=0, path=str(seed_like_file(n=5)),
                                      select=False)
    assert summary["selected"] == summary["kept"] == 5


def test_sample_more_than_exists_is_noted(qwen_tokenizer, seed_like_file):
    cfg = DataConfig(path=str(seed_like_file(n=4)), sample=50)
    _, summary = build_dataset(cfg, qwen_tokenizer, seed=0)
    assert summary["selected"] == 4
    assert "data.sample=50" in summary["notes"][0]


def write_answers(tmp_path, answers):
    rows = [{"instruction": "i", "input": "x", "output": a} for a in answers]
    path = tmp_path / "answers.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return str(path)


def test_skipped_records_are_counted(qwen_tokenizer, tmp_path):
    path = write_answers(tmp_path, ["短", "长" * 200, "好"])
    examples, summary = build_dataset(DataConfig(path=path, max_length=64), qwen_tokenizer, seed=0)
    assert [e.record_index for e in examples] == [1, 3]
    assert summary["skipped"] == 1 and sum(summary["skipped_reasons"].values()) == 1


def test_all_skipped_is_a_user_error(qwen_tokenizer, tmp_path):
    path = write_answers(tmp_path, ["长" * 100, "长" * 80])
    with pytest.raises(UserError, match=r"no record fits data.max_length=32: the shortest answer needs \d+"):
        build_dataset(DataConfig(path=path, max_length=32), qwen_tokenizer, seed=0)


def test_print_summary_renders(qwen_tokenizer, seed_like_file):
    _, summary = build_dataset(DataConfig(path=str(seed_like_file(n=3)), max_length=128),
                               qwen_tokenizer, seed=0)
    console = Console(record=True, width=120)
    print_summary(summary, console=console)
    text = console.export_text()
    assert "3 / 3 / 3" in text and "tokens per sequence" in text


def test_print_summary_keeps_lines_whole_at_80_columns(qwen_tokenizer, seed_like_file):
    _, summary = build_dataset(DataConfig(path=str(seed_like_file(n=3)), max_length=128),
                               qwen_tokenizer, seed=0)
    console = Console(record=True, width=80)
    print_summary(summary, console=console)
    lines = console.export_text().splitlines()
    tok = summary["tokens"]
    expected = (f"min {tok['min']}  p10 {tok['p10']}  p50 {tok['p50']}  p90 {tok['p90']}  "
                f"max {tok['max']}  mean {tok['mean']}")
    assert any(line.endswith(expected) for line in lines), lines


def test_percentile_nearest_rank():
    values = list(range(1, 11))
    assert [percentile(values, q) for q in (10, 50, 90, 100)] == [1, 5, 9, 10]
    assert percentile([7], 50) == 7


def test_inference_prompt_matches_training_prompt(qwen_tokenizer, seed_like_file):
    cfg = DataConfig(path=str(seed_like_file(n=2, input_chars=100)), system_prompt="P")
    examples, _ = build_dataset(cfg, qwen_tokenizer, seed=0)
    from loralab.data.records import read_records

    record = read_records(cfg.path)[0]
    ids = [t for t, lab in zip(examples[0].input_ids, examples[0].labels, strict=True) if lab == IGNORE_INDEX]
    assert qwen_tokenizer.decode(ids) == render_prompt(qwen_tokenizer, "P", record.messages)


def test_records_are_encoded_once_per_tokenizer_and_length(qwen_tokenizer, seed_like_file,
                                                           monkeypatch):
    """A sweep builds each trial's dataset from the same records: the second build encodes
    nothing, gives the same examples, and a new max_length, record or tokenizer re-encodes."""
    import copy

    from loralab.data import summary as summary_module

    calls = []
    real = summary_module.encode_record
    monkeypatch.setattr(summary_module, "encode_record",
                        lambda tok, record, n: calls.append(record.index) or real(tok, record, n))
    monkeypatch.setattr(summary_module, "_ENCODED", summary_module._EncodeCache())
    path = seed_like_file(n=6, input_chars=700)
    first, _ = build_dataset(DataConfig(path=str(path), max_length=256), qwen_tokenizer, seed=0)
    assert len(calls) == 6
    again, _ = build_dataset(DataConfig(path=str(path), max_length=256, limit=4),
                             qwen_tokenizer, seed=1)
    assert len(calls) == 6 and again == first[:4]
    build_dataset(DataConfig(path=str(path), max_length=128), qwen_tokenizer, seed=0)
    assert len(calls) == 12  # another length: other truncation
    records = json.loads(path.read_text())
    records[0]["output"] = records[0]["output"] + " changed"
    path.write_text(json.dumps(records))
    changed, _ = build_dataset(DataConfig(path=str(path), max_length=256), qwen_tokenizer, seed=0)
    assert len(calls) == 13 and changed[0] != first[0] and changed[1:] == first[1:]
    build_dataset(DataConfig(path=str(path), max_length=256), copy.deepcopy(qwen_tokenizer), seed=0)
    assert len(calls) == 19  # another tokenizer object: everything again
