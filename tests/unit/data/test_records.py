"""Reading records: every supported layout, and one clear error per defect."""

from __future__ import annotations

import json

import pytest

from loralab.data.records import apply_system_prompt, read_records, select_records
from loralab.errors import UserError


def write_json(tmp_path, rows, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_alpaca_seed_layout(tmp_path):
    path = write_json(tmp_path, [{"instruction": "将以下文本分类", "input": "文章", "output": "{}"}])
    [record] = read_records(path)
    assert record.index == 1
    assert record.system == "将以下文本分类"
    assert record.messages == [{"role": "user", "content": "文章"}]
    assert record.answer == "{}"


def test_alpaca_without_input_makes_instruction_the_user_turn(tmp_path):
    rows = [{"instruction": "Say hi", "input": "", "output": "hi"}, {"instruction": "Q", "output": "A"}]
    records = read_records(write_json(tmp_path, rows))
    assert [r.system for r in records] == [None, None]
    assert [r.messages[0]["content"] for r in records] == ["Say hi", "Q"]


def test_chat_records_jsonl(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                      {"role": "assistant", "content": "A"}]},
        {"messages": [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
                      {"role": "user", "content": "U2"}, {"role": "assistant", "content": "A2"}]},
    ]
    first, second = read_records(write_jsonl(tmp_path, rows))
    assert (first.system, first.messages, first.answer) == ("S", [{"role": "user", "content": "U"}], "A")
    assert second.system is None
    assert [m["content"] for m in second.messages] == ["U1", "A1", "U2"]
    assert second.answer == "A2"
    assert second.index == 2


def test_prompt_completion_with_system(tmp_path):
    path = write_jsonl(tmp_path, [{"prompt": "P", "completion": "C", "system": "S"}])
    [record] = read_records(path)
    assert (record.system, record.messages[0]["content"], record.answer) == ("S", "P", "C")


def test_jsonl_skips_blank_lines_and_reads_bom(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_text('\ufeff{"prompt": "P", "completion": "C"}\n\n{"prompt": "Q", "completion": "D"}\n',
                    encoding="utf-8")
    assert [r.answer for r in read_records(path)] == ["C", "D"]


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"instruction": "a", "output": "b"}', r"not valid JSON \(line 1, column"),
        ('{"a": 1}\n{"b": ', r"record 2 \(line 2\) is not valid JSON"),
        ('{\n "data": []\n}', "holds one JSON dict: expected a JSON array"),
        ("   \n", "is empty"),
        ("[]", "holds no records"),
        ('"text"', r"record 1 \(line 1\): is a JSON string"),
    ],
)
def test_file_level_errors(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        read_records(path)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="data file not found"):
        read_records(tmp_path / "nope.json")


@pytest.mark.parametrize(
    "record, message",
    [
        ({"instruction": "a", "input": "b"}, "missing field.*output"),
        ({"output": "b"}, "missing field.*instruction or input"),
        ({"prompt": "p"}, "missing field.*completion"),
        ({"instruction": "a", "input": "b", "output": "  "}, "answer is empty"),
        ({"instruction": "a", "input": "b", "output": {"x": 1}}, "output is a JSON object, expected a string"),
        ({"question": "q", "answer": "a"}, "unknown record shape .keys: answer, question"),
        ({"messages": [{"role": "user", "content": "U"}]}, "last message must be the assistant"),
        ({"messages": [{"role": "assistant", "content": "A"}]}, "no user turn"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "A"}]},
         "message 1 content is a JSON number"),
        ({"messages": [{"role": "bot", "content": "U"}]}, "role 'bot'"),
        ({"messages": "hi"}, "non-empty list"),
    ],
)
def test_record_errors_name_file_and_record(tmp_path, record, message):
    good = {"instruction": "i", "input": "x", "output": "y"}
    path = write_jsonl(tmp_path, [good, good, record])
    with pytest.raises(UserError, match=message) as info:
        read_records(path)
    assert f"{path}: record 3 (line 3)" in str(info.value)


def test_json_array_errors_name_the_record(tmp_path):
    path = write_json(tmp_path, [{"instruction": "i", "input": "x", "output": "y"}, {"input": "x"}])
    with pytest.raises(UserError, match=r"record 2: missing field\(s\): output"):
        read_records(path)


def test_apply_system_prompt_replaces_every_system(tmp_path):
    rows = [{"instruction": "short", "input": "x", "output": "y"}, {"instruction": "q", "output": "a"}]
    records = read_records(write_json(tmp_path, rows))
    assert apply_system_prompt(records, None) is records
    replaced = apply_system_prompt(records, "LONG PROMPT")
    assert [r.system for r in replaced] == ["LONG PROMPT", "LONG PROMPT"]
    assert records[0].system == "short"  # the originals are untouched


def make_records(tmp_path, n):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(n)]
    return read_records(write_jsonl(tmp_path, rows))


def test_select_limit_and_sample(tmp_path):
    records = make_records(tmp_path, 30)
    assert [r.index for r in select_records(records, 5, None, seed=0)] == [1, 2, 3, 4, 5]
    sampled = select_records(records, None, 7, seed=1)
    indices = [r.index for r in sampled]
    assert len(set(indices)) == 7 and indices == sorted(indices)
    assert indices == [r.index for r in select_records(records, None, 7, seed=1)]
    assert indices != [r.index for r in select_records(records, None, 7, seed=2)]
    assert indices != list(range(1, 8))


def test_select_more_than_exists_uses_all(tmp_path):
    records = make_records(tmp_path, 4)
    assert len(select_records(records, 50, None, seed=0)) == 4
    assert len(select_records(records, None, 50, seed=0)) == 4
    assert len(select_records(records, None, None, seed=0)) == 4


def test_select_rejects_both_and_empty(tmp_path):
    records = make_records(tmp_path, 4)
    with pytest.raises(UserError, match="exclusive"):
        select_records(records, 1, 1, seed=0)
    with pytest.raises(UserError, match="no records left"):
        select_records([], None, None, seed=0)


def test_a_mix_of_files_keeps_each_files_own_limit_and_sample(tmp_path):
    from loralab.data.records import read_mix

    def write(name, n):
        rows = [{"instruction": "s", "input": f"{name} {i}", "output": f"{name}-{i}"} for i in range(n)]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(rows))
        return str(path)

    a, b, c = write("a", 5), write("b", 6), write("c", 2)
    records, notes = read_mix([a, {"path": b, "limit": 2}, {"path": c, "sample": 9}], seed=0)
    assert [r.answer for r in records] == ["a-0", "a-1", "a-2", "a-3", "a-4", "b-0", "b-1",
                                           "c-0", "c-1"]
    assert len(notes) == 1 and c in notes[0] and "sample=9" in notes[0]
    sampled, _ = read_mix([{"path": b, "sample": 3}], seed=0)
    assert len(sampled) == 3 and {r.answer for r in sampled} <= {f"b-{i}" for i in range(6)}


def test_a_mix_in_the_config_is_checked_and_resolved_next_to_the_yaml(tmp_path):
    from loralab.config import load_config
    from loralab.errors import UserError

    (tmp_path / "cfg.yaml").write_text(
        "data:\n  path: [a.json, {path: sub/b.json, limit: 4}]\noutput_dir: out\n")
    cfg = load_config(tmp_path / "cfg.yaml")
    assert cfg.data.path == [str(tmp_path / "a.json"), {"path": str(tmp_path / "sub/b.json"),
                                                        "limit": 4}]
    for bad, message in (("[a.json, {path: b.json, limit: 0}]", "limit must be a positive"),
                         ("[a.json, {path: b.json, lmit: 3}]", "unknown keys"),
                         ("[a.json, 3]", r"data.path\[1\] must be a file path")):
        with pytest.raises(UserError, match=message):
            load_config(tmp_path / "cfg.yaml", [f"data.path={bad}"])
