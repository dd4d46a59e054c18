from __future__ import annotations

import csv
import io
import json

from loralab.io import append_jsonl
from loralab.sweep.summary import collect_rows, plot_loss_curves, to_csv, to_markdown, write_summary


def _manifest(tmp_path):
    trials = []
    for name, r, status in (("r4", 4, "done"), ("r8", 8, "failed")):
        run = tmp_path / name
        run.mkdir()
        trials.append({
            "name": name, "overrides": {"lora.r": r}, "path": str(run), "status": status,
            "error": None if status == "done" else "FloatingPointError: loss is nan",
            "result": {"final_loss": 0.5, "steps": 2, "tokens_per_s": 1234.5, "wall_seconds": 3.25}
            if status == "done" else None,
        })
    return {"name": "ranks", "varying": ["lora.r"], "trials": trials}


def test_rows_carry_swept_values_results_and_eval_metrics(tmp_path):
    m = _manifest(tmp_path)
    (tmp_path / "r4" / "eval").mkdir()
    (tmp_path / "r4" / "eval" / "metrics.json").write_text(
        json.dumps({"weighted_accuracy": 0.86, "f1": 0.82, "valid_rate": 1.0, "ci": {}}))
    rows = collect_rows(m)
    assert rows[0]["lora.r"] == 4 and rows[0]["final_loss"] == 0.5
    assert rows[0]["eval.weighted_accuracy"] == 0.86 and rows[0]["eval.f1"] == 0.82
    assert "eval.f1" not in rows[1] and rows[1]["status"] == "failed"
    table = list(csv.DictReader(io.StringIO(to_csv(rows))))
    assert table[0]["eval.f1"] == "0.82" and table[1]["eval.f1"] == ""
    assert table[1]["error"].startswith("FloatingPointError")
    md = to_markdown(rows, "ranks")
    assert "| trial | status | lora.r | loss |" in md and "| r4 | done | 4 | 0.5 | 2 | 1,234 |" in md


def test_loss_curve_png_overlays_every_trial_with_metrics(tmp_path):
    m = _manifest(tmp_path)
    assert plot_loss_curves(m, tmp_path / "none.png") is None  # no metrics.jsonl yet
    for step, loss in ((1, 2.0), (2, 1.5), (3, 1.2)):
        append_jsonl(tmp_path / "r4" / "metrics.jsonl", {"step": step, "loss": loss})
    out = plot_loss_curves(m, tmp_path / "loss_curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = write_summary(m, tmp_path, show=False)
    assert {p.name for p in written} == {"sweep.md", "sweep.csv", "loss_curves.png"}
