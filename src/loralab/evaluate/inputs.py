"""The inputs of `loralab predict` (the command is commands/eval.py's; serve's load benchmark
reads its inputs here too)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loralab.errors import UserError


def read_inputs(path: Path) -> list[dict[str, Any]]:
    """Inputs as chat turns: training records (answer ignored), {input}/{prompt} or strings."""
    from loralab.data.records import parse_record

    if not path.is_file():
        raise UserError(f"input file not found: {path}")
    text = path.read_text(encoding="utf-8-sig")
    try:
        items = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not a JSON array or JSONL (line {exc.lineno}): {exc.msg}") from None
    if not isinstance(items, list) or not items:
        raise UserError(f"{path} holds no inputs")
    out = []
    for i, item in enumerate(items, 1):
        if isinstance(item, str):
            out.append({"system": None, "messages": [{"role": "user", "content": item}]})
            continue
        if isinstance(item, dict) and "messages" in item and item["messages"] and \
                item["messages"][-1].get("role") == "user":
            item = {**item, "messages": [*item["messages"], {"role": "assistant", "content": "-"}]}
        elif isinstance(item, dict) and "prompt" in item:
            item = {"completion": "-", **item}  # the answer is not needed to ask
        elif isinstance(item, dict) and "messages" not in item:
            item = {"output": "-", **item}
        try:
            record = parse_record(item, i)
        except Exception as exc:
            raise UserError(f"{path}: input {i}: {exc}") from None
        out.append({"system": record.system, "messages": record.messages})
    return out
