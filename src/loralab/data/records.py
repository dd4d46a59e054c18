"""Training records: read JSON / JSONL files (alpaca, chat, prompt/completion), select a subset."""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralab.errors import UserError

ROLES_BEFORE_ANSWER = ("user", "assistant")
SHAPES_HELP = (
    "expected alpaca {instruction, input, output}, chat {messages: [...]} "
    "or {prompt, completion}"
)


@dataclass
class Record:
    """One training conversation: the turns before the answer, and the answer."""

    index: int  # 1-based record number in the file (for error messages)
    system: str | None  # system prompt (None: the template's default)
    messages: list[dict[str, str]]  # turns before the answer: {"role": "user"|"assistant", ...}
    answer: str  # the assistant reply that carries the loss


class _RecordError(Exception):
    """A problem inside one record; read_records adds the file and the record number."""


# ---------------------------------------------------------------- reading files


def read_records(path: str | Path) -> list[Record]:
    """Every record of a JSON-array or JSONL file; any defect is a one-line UserError."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read data file {p}: {exc}") from None
    if not text.strip():
        raise UserError(f"data file {p} is empty")
    if text.lstrip().startswith("["):
        rows = _json_array_rows(p, text)
    else:
        rows = _jsonl_rows(p, text)
    if not rows:
        raise UserError(f"data file {p} holds no records")
    records = []
    for number, (line, obj) in enumerate(rows, start=1):
        try:
            records.append(parse_record(obj, number))
        except _RecordError as exc:
            where = f"record {number}" + (f" (line {line})" if line is not None else "")
            raise UserError(f"{p}: {where}: {exc}") from None
    return records


def _json_array_rows(p: Path, text: str) -> list[tuple[int | None, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{p} is not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}"
        ) from None
    if not isinstance(data, list):
        raise UserError(f"{p} must hold a JSON array of records or one JSON object per line")
    return [(None, obj) for obj in data]


def _jsonl_rows(p: Path, text: str) -> list[tuple[int | None, Any]]:
    rows: list[tuple[int | None, Any]] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((line_no, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise UserError(_jsonl_error(p, text, len(rows) + 1, line_no, exc)) from None
    return rows


def _jsonl_error(p: Path, text: str, number: int, line_no: int, exc: json.JSONDecodeError) -> str:
    """Say so when the file is one JSON value spread over lines rather than JSONL."""
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if whole is not None:
        return (
            f"{p} holds one JSON {type(whole).__name__}: expected a JSON array of records "
            "or one JSON object per line (JSONL)"
        )
    return (
        f"{p}: record {number} (line {line_no}) is not valid JSON "
        f"(column {exc.colno}): {exc.msg}"
    )


# ---------------------------------------------------------------- record shapes


def parse_record(obj: Any, index: int) -> Record:
    """One record from its JSON object; raises _RecordError for defects."""
    if not isinstance(obj, dict):
        raise _RecordError(f"is a JSON {_json_type(obj)}, expected an object ({SHAPES_HELP})")
    if "messages" in obj:
        record = _chat_record(obj, index)
    elif "prompt" in obj or "completion" in obj:
        record = _prompt_completion_record(obj, index)
    elif {"instruction", "input", "output"} & obj.keys():
        record = _alpaca_record(obj, index)
    else:
        keys = ", ".join(sorted(map(str, obj))) or "none"
        raise _RecordError(f"unknown record shape (keys: {keys}); {SHAPES_HELP}")
    if not record.answer.strip():
        raise _RecordError("the answer is empty")
    return record


def _alpaca_record(obj: dict[str, Any], index: int) -> Record:
    """The seed's layout: instruction is the system prompt, input the user turn."""
    missing = [key for key in ("output",) if key not in obj]
    if "instruction" not in obj and "input" not in obj:
        missing.insert(0, "instruction or input")
    if missing:
        raise _RecordError(f"missing field(s): {', '.join(missing)}")
    instruction = _optional_text(obj, "instruction")
    user_input = _optional_text(obj, "input")
    answer = _text(obj, "output")
    system = _optional_text(obj, "system")
    if system:
        # An explicit system field: instruction and input together form the user turn.
        user = "\n\n".join(part for part in (instruction, user_input) if part)
    elif user_input:
        system, user = instruction or None, user_input
    else:
        system, user = None, instruction
    if not user:
        raise _RecordError("instruction and input are both empty: nothing to ask")
    return Record(index, system, [{"role": "user", "content": user}], answer)


def _prompt_completion_record(obj: dict[str, Any], index: int) -> Record:
    missing = [key for key in ("prompt", "completion") if key not in obj]
    if missing:
        raise _RecordError(f"missing field(s): {', '.join(missing)}")
    system = _optional_text(obj, "system") or None
    user = _text(obj, "prompt")
    return Record(index, system, [{"role": "user", "content": user}], _text(obj, "completion"))


def _chat_record(obj: dict[str, Any], index: int) -> Record:
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise _RecordError("messages must be a non-empty list of {role, content} objects")
    turns = [_message(m, i) for i, m in enumerate(messages, start=1)]
    system = _optional_text(obj, "system") or None
    if turns[0]["role"] == "system":
        system = turns.pop(0)["content"]
    if not turns or turns[-1]["role"] != "assistant":
        raise _RecordError("the last message must be the assistant's answer")
    answer = turns.pop()["content"]
    for i, turn in enumerate(turns, start=1):
        if turn["role"] not in ROLES_BEFORE_ANSWER:
            raise _RecordError(f"message role {turn['role']!r} is only allowed first (system)")
        expected = "user" if i % 2 else "assistant"
        if turn["role"] != expected:
            raise _RecordError("messages must alternate user / assistant, starting with user")
    if not turns:
        raise _RecordError("messages hold no user turn before the answer")
    return Record(index, system, turns, answer)


def _message(message: Any, position: int) -> dict[str, str]:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise _RecordError(f"message {position} must be an object with role and content")
    role, content = message["role"], message["content"]
    if role not in ("system", "user", "assistant"):
        raise _RecordError(f"message {position} has role {role!r}: use system, user or assistant")
    if not isinstance(content, str):
        raise _RecordError(
            f"message {position} content is a JSON {_json_type(content)}, expected a string"
        )
    return {"role": role, "content": content}


def _text(obj: dict[str, Any], key: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        hint = " (write it as a JSON string)" if isinstance(value, (dict, list)) else ""
        raise _RecordError(f"field {key} is a JSON {_json_type(value)}, expected a string{hint}")
    return value


def _optional_text(obj: dict[str, Any], key: str) -> str:
    if obj.get(key) is None:
        return ""
    return _text(obj, key)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


# ---------------------------------------------------------------- selection


def apply_system_prompt(records: list[Record], system_prompt: str | None) -> list[Record]:
    """Give every record the same system prompt (the one used at inference); None keeps them."""
    if system_prompt is None:
        return records
    return [dataclasses.replace(r, system=system_prompt) for r in records]


def select_records(
    records: list[Record], limit: int | None, sample: int | None, seed: int
) -> list[Record]:
    """The first `limit` records, or `sample` drawn with `seed` (in file order), or all."""
    if limit is not None and sample is not None:
        raise UserError("data.limit and data.sample are exclusive: set one of them")
    if limit is not None:
        chosen = records[:limit]
    elif sample is not None and sample < len(records):
        picked = sorted(random.Random(seed).sample(range(len(records)), sample))
        chosen = [records[i] for i in picked]
    else:
        chosen = list(records)
    if not chosen:
        raise UserError("no records left after data.limit / data.sample")
    return chosen


def selection_note(n_records: int, limit: int | None, sample: int | None) -> str | None:
    """A line for the summary when more records were asked for than the file holds."""
    wanted = limit if limit is not None else sample
    if wanted is not None and wanted > n_records:
        key = "limit" if limit is not None else "sample"
        return f"data.{key}={wanted} but the file holds {n_records} records: using all of them"
    return None


def read_mix(parts: list[Any], seed: int) -> tuple[list[Record], list[str]]:
    """A data.path list: each file read and cut to its own limit/sample, then all in order.
    Returns the records and the summary's notes (a part that asked for more than it holds)."""
    records: list[Record] = []
    notes: list[str] = []
    for part in parts:
        path = part if isinstance(part, str) else part["path"]
        limit = None if isinstance(part, str) else part.get("limit")
        sample = None if isinstance(part, str) else part.get("sample")
        rows = read_records(path)
        records += select_records(rows, limit, sample, seed)
        note = selection_note(len(rows), limit, sample)
        if note:
            notes.append(f"{path}: {note}")
    return records, notes


def mix_paths(source: str | list[Any]) -> list[str]:
    """The files of data.path (one, or each of a list)."""
    if isinstance(source, str):
        return [source]
    return [p if isinstance(p, str) else p["path"] for p in source]

