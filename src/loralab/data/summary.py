"""Build the tokenised dataset from a config and summarise what happened to every record."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from loralab.data.records import (
    apply_system_prompt,
    mix_paths,
    read_mix,
    read_records,
    select_records,
    selection_note,
)
from loralab.data.render import Example, encode_record, required_length
from loralab.errors import UserError

if TYPE_CHECKING:
    from loralab.config import DataConfig


class _EncodeCache:
    """encode_record's results in this process, for one tokenizer at a time. A sweep's trials
    read the same records (the same file, or subsets of it) on one base: tokenising them again
    per trial was ~5 s a trial of a packed sweep's start on the seed's 1,450 records. Keyed by
    the record's number and content and max_length; a new tokenizer object empties it."""

    LIMIT = 200_000  # entries kept at most (a few hundred MB of ids): emptied beyond

    def __init__(self) -> None:
        self.tokenizer: Any = None
        self.entries: dict[tuple, Example | str] = {}

    def encode(self, tokenizer: Any, record: Any, max_length: int) -> Example | str:
        if tokenizer is not self.tokenizer or len(self.entries) >= self.LIMIT:
            self.tokenizer, self.entries = tokenizer, {}
        key = (record.index, record.system, record.answer, max_length,
               tuple(tuple(sorted(m.items())) for m in record.messages))
        if key not in self.entries:
            self.entries[key] = encode_record(tokenizer, record, max_length)
        return self.entries[key]


_ENCODED = _EncodeCache()


def build_dataset(
    data_cfg: DataConfig, tokenizer: Any, seed: int, path: str | None = None, select: bool = True
) -> tuple[list[Example], dict[str, Any]]:
    """Read, re-prompt, select and encode records; the summary says what was cut or skipped.

    `select=False` keeps every record (data.limit / data.sample are for the training file).
    """
    source = path or data_cfg.path
    if not source:
        raise UserError("data.path is empty: give the training file")
    if isinstance(source, list):
        records, notes = read_mix(source, seed)
    else:
        records, notes = read_records(source), []
    records = apply_system_prompt(records, data_cfg.system_prompt)
    if select:
        chosen = select_records(records, data_cfg.limit, data_cfg.sample, seed)
        note = selection_note(len(records), data_cfg.limit, data_cfg.sample)
        notes += [note] if note else []
    else:
        chosen = list(records)
    examples: list[Example] = []
    skipped: Counter[str] = Counter()
    for record in chosen:
        result = _ENCODED.encode(tokenizer, record, data_cfg.max_length)
        if isinstance(result, str):
            skipped[result] += 1
        else:
            examples.append(result)
    if not examples:
        shortest = min(required_length(tokenizer, r) for r in chosen)
        raise UserError(
            f"no record fits data.max_length={data_cfg.max_length}: "
            f"the shortest answer needs {shortest} tokens"
        )
    summary = summarize(examples, skipped, n_read=len(records), n_selected=len(chosen))
    summary.update(path=", ".join(mix_paths(source)), max_length=data_cfg.max_length, notes=notes)
    return examples, summary


def summarize(
    examples: list[Example], skipped: Counter[str], n_read: int, n_selected: int
) -> dict[str, Any]:
    """Counts and length statistics of the encoded examples."""
    lengths = [len(e.input_ids) for e in examples]
    answers = [sum(1 for label in e.labels if label != -100) for e in examples]
    return {
        "records": n_read,
        "selected": n_selected,
        "kept": len(examples),
        "truncated": sum(1 for e in examples if e.truncated),
        "truncated_tokens": sum(e.truncated for e in examples),
        "skipped": sum(skipped.values()),
        "skipped_reasons": dict(skipped),
        "tokens": {
            "min": min(lengths),
            "p10": percentile(lengths, 10),
            "p50": percentile(lengths, 50),
            "p90": percentile(lengths, 90),
            "max": max(lengths),
            "mean": round(sum(lengths) / len(lengths), 1),
        },
        "labelled_tokens": sum(answers),
        "answer_tokens": {"p50": percentile(answers, 50), "max": max(answers)},
    }


def percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile (a value that occurs in the data)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least 1
    return ordered[int(rank) - 1]


def print_summary(summary: dict[str, Any], console: Any = None) -> None:
    """The dataset summary as `what: value` lines: whole at any width, plain when redirected."""
    from rich.console import Console

    console = console or Console()
    tok, ans = summary["tokens"], summary["answer_tokens"]
    reasons = ", ".join(f"{k}: {v}" for k, v in summary["skipped_reasons"].items())
    rows = [
        ("records read / selected / kept",
         f"{summary['records']} / {summary['selected']} / {summary['kept']}"),
        ("prompts truncated", f"{summary['truncated']} ({summary['truncated_tokens']} tokens cut)"),
        ("skipped", f"{summary['skipped']}" + (f" ({reasons})" if reasons else "")),
        ("tokens per sequence", f"min {tok['min']}  p10 {tok['p10']}  p50 {tok['p50']}  "
                                f"p90 {tok['p90']}  max {tok['max']}  mean {tok['mean']}"),
        ("labelled tokens",
         f"{summary['labelled_tokens']} (per answer: p50 {ans['p50']}, max {ans['max']})"),
        *(("note", note) for note in summary.get("notes", [])),
    ]
    console.print(f"[bold]data[/bold]: {summary.get('path', '')}", soft_wrap=True, highlight=False)
    for what, value in rows:
        # soft_wrap: rich inserts no line breaks of its own, so no number is ever split.
        console.print(f"  {what + ':':<32}{value}", soft_wrap=True, highlight=False)
