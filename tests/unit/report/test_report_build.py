"""A report built from a hand-made folder of fake predictions: files, columns, numbers, errors."""

from __future__ import annotations

import csv
import json
import re
import shutil

import pytest

from loralab.errors import UserError
from loralab.report.build import build_report, report_from_dir, resolve_report_dir


def read_csv(path):
    with open(path, encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_report_from_comparison_folder(built):
    comp, result = built
    for name in ("comparison.csv", "comparison.md", "report.html", "metrics.png",
                 "hyperparams.png", "per_tag_mae.png", "scatter_base.png",
                 "scatter_r8-lr1e-4.png"):
        assert (comp / name).is_file(), name
    rows = read_csv(comp / "comparison.csv")
    assert [r["target"] for r in rows] == ["base", "r8-lr1e-4", "r16-lr1e-3", "empty",
                                           "all_zeros", "train_mean", "train_median"]
    assert [r["kind"] for r in rows] == ["base", "adapter", "adapter"] + ["reference"] * 4
    header = list(rows[0])
    for col in ("weighted_accuracy", "weighted_accuracy_low", "weighted_accuracy_high",
                "f1_lift", "f1_vs_base", "f1_distinguishable", "weighted_error_lift",
                "valid_rate", "lora.r", "train.lr", "data.limit", "train.epochs",
                "tokens_per_s", "precision", "recall", "json_rate"):
        assert col in header, col
    assert result["task"] == "tag_scores" and len(result["rows"]) == 7


def test_report_numbers(built):
    rows = {r["target"]: r for r in built[1]["rows"]}
    good, weak, base = rows["r8-lr1e-4"], rows["r16-lr1e-3"], rows["base"]
    assert good["weighted_accuracy"] == pytest.approx(1 - 1 / (90 * 16))
    assert good["weighted_accuracy_low"] <= good["weighted_accuracy"] <= good["weighted_accuracy_high"]
    assert good["f1_distinguishable"] and good["f1_vs_base"] > 0.5
    assert base["f1_vs_base"] is None and base["f1"] == 0.0
    # weak copies one tag onto all zeros: never worse than the all_zeros reference
    assert weak["weighted_accuracy_lift"] > 0
    best_ref_error = min(rows[r]["weighted_error"] for r in ("empty", "all_zeros", "train_mean",
                                                              "train_median"))
    assert good["weighted_error_lift"] == pytest.approx(best_ref_error - good["weighted_error"])
    assert good["lora.r"] == 8 and weak["train.lr"] == pytest.approx(1e-3)
    assert max(rows[r]["f1_lift"] for r in ("empty", "all_zeros", "train_mean",
                                           "train_median")) == 0


def test_markdown_and_html(built):
    comp, result = built
    md = (comp / "comparison.md").read_text(encoding="utf-8")
    assert "| target | kind | n | weighted_accuracy" in md and "r16-lr1e-3" in md
    assert "lora.r" in md and "train.lr" in md  # the hyperparameters that vary
    html = (comp / "report.html").read_text(encoding="utf-8")
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert sorted(sources) == sorted(p.name for p in result["plots"])
    assert all((comp / s).is_file() for s in sources)
    assert "<table>" in html and "train_median" in html


def test_png_is_a_real_image(built):
    result = built[1]
    for png in result["plots"]:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png


def test_sweep_dir_resolves_to_evaluated_trials_and_comparison(sweep_dir, tmp_path):
    comp, targets = resolve_report_dir(sweep_dir)
    assert comp == sweep_dir / "comparison"
    names = [t.parent.name if t.name == "eval" else t.name for t in targets]
    assert names[:2] == ["r8-lr1e-4", "r16-lr1e-3"] and "r4-lr1e-2" not in names
    assert len(targets) == 7  # duplicates from targets.json removed
    out = tmp_path / "elsewhere"
    report_from_dir(sweep_dir, out)
    assert (out / "report.html").is_file()


def test_run_dir_without_comparison(sweep_dir, tmp_path):
    run = sweep_dir / "r8-lr1e-4"
    result = report_from_dir(run, tmp_path / "out")
    assert [r["target"] for r in result["rows"]] == ["r8-lr1e-4"]
    assert result["rows"][0]["f1_lift"] is None
    assert "no base model" in result["markdown_text"]


def test_sweep_with_nothing_evaluated(tmp_path):
    (tmp_path / "sweep.json").write_text(json.dumps({"trials": [{"path": "t1"}]}))
    with pytest.raises(UserError, match="evaluated"):
        resolve_report_dir(tmp_path)


def test_malformed_inputs_are_user_errors(sweep_dir, tmp_path):
    with pytest.raises(UserError, match="holds no targets.json"):
        resolve_report_dir(tmp_path)
    with pytest.raises(UserError, match="not a folder"):
        resolve_report_dir(tmp_path / "missing")
    (tmp_path / "sweep.json").write_text('{"trials": [{"name": "x"}]}')
    with pytest.raises(UserError, match="sweep.json must hold"):
        resolve_report_dir(tmp_path)
    (sweep_dir / "r16-lr1e-3" / "eval" / "metrics.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        report_from_dir(sweep_dir / "comparison")
    shutil.rmtree(sweep_dir / "comparison" / "base")
    with pytest.raises(UserError, match="not found"):
        report_from_dir(sweep_dir / "comparison")


def test_mixed_tasks_are_refused(sweep_dir):
    path = sweep_dir / "r16-lr1e-3" / "eval" / "metrics.json"
    metrics = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**metrics, "task": "generic"}), encoding="utf-8")
    with pytest.raises(UserError, match="different tasks"):
        report_from_dir(sweep_dir / "comparison")


def test_duplicate_names_and_unpaired_records(sweep_dir, tmp_path):
    comp = sweep_dir / "comparison"
    a = sweep_dir / "r8-lr1e-4" / "eval"
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)
    lines = (copy / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    (copy / "predictions.jsonl").write_text("\n".join(reversed(lines)) + "\n", encoding="utf-8")
    result = build_report(tmp_path / "out", [comp / "base", a, copy])
    names = [r["target"] for r in result["rows"]]
    assert names == ["base", "r8-lr1e-4", "r8-lr1e-4#2"]
    assert result["rows"][2]["f1_vs_base"] is None
    assert "r8-lr1e-4#2" in result["markdown_text"] and "same eval records" in result["markdown_text"]


def test_generic_task_report_without_intervals(tmp_path):
    from loralab.config import EvalConfig
    from loralab.scoring.references import score_references
    from loralab.scoring.tasks import get_task, score_predictions, write_target_results

    refs = ["答案甲", "答案乙", "答案甲"]
    eval_rows = [{"input": str(i), "reference": r} for i, r in enumerate(refs)]
    folders = score_references(EvalConfig(task="generic"), ["答案甲", "答案丙", "答案甲"],
                               eval_rows, tmp_path, bootstrap=0)
    for name, kind, gens in (("base", "base", ["", "", ""]),
                             ("run", "adapter", ["答案甲", "答案乙", "答案"])):
        rows = [{**r, "generation": g} for r, g in zip(eval_rows, gens, strict=True)]
        scored, metrics = score_predictions(get_task(EvalConfig(task="generic")), rows, bootstrap=0)
        folders.append(write_target_results(
            tmp_path / name, scored, {"target": name, "kind": kind, **metrics}))
    result = build_report(tmp_path / "out", folders)
    assert [p.name for p in result["plots"]] == ["metrics.png"]
    rows = {r["target"]: r for r in result["rows"]}
    assert rows["run"]["exact_match"] == pytest.approx(2 / 3)
    assert rows["run"]["exact_match_lift"] == pytest.approx(0)  # most_frequent also hits 2 of 3
    assert rows["run"]["exact_match_low"] is None
    assert rows["run"]["rouge_l_vs_base"] > 0
    header = read_csv(tmp_path / "out" / "comparison.csv")[0]
    assert "rouge_l_distinguishable" in header and "weighted_accuracy" not in header
