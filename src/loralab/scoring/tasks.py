"""Task plug-ins, scoring of generations, and the files an evaluated target leaves on disk.

On-disk contract (the generation side writes it with `score_predictions` + `write_target_results`;
`loralab report` only reads it):

An *evaluated target* (the base model, one adapter run, or a reference predictor) is a folder
holding
- `predictions.jsonl`: one row per eval record, in eval-file order:
  `input`, `reference` (the expected answer), `generation` (raw text), `finished` (bool: the model
  stopped by itself before max_new_tokens; absent for reference predictors), `parsed` (the
  task's parse of the generation), then the task's per-record metrics (tag_scores: `json_ok`,
  `valid`, `out_of_range`, `weighted_accuracy`, `weighted_error`, `precision`, `recall`, `f1`,
  `abs_error` {tag: |pred − truth|}; generic: `valid`, `exact_match`, `char_f1`, `rouge_l`).
- `metrics.json`: `{"target": name, "kind": "base"|"adapter"|"reference", "run_dir": path|null,
  "task": name, "n": records, <aggregate metrics>, "ci": {metric: [low, high]},
  "per_tag_mae": {tag: mae} and "task_params": {"tags", "score_min", "score_max", "tolerance"}
  (tag_scores), "finished_rate" (when rows carry `finished`),
  "hyperparams": {"lora.r", "lora.alpha", "train.lr", "data.limit", "train.epochs",
  "train.max_steps"} (adapters, from the run's config.yaml), "gen": {"new_tokens", "seconds",
  "tokens_per_s"}}`.

Where these folders are, and the comparison folder's `targets.json` listing them: `loralab.layout`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from loralab.config_io import get_dotted, read_yaml_mapping
from loralab.errors import UserError
from loralab.io import atomic_write_text, read_json, read_jsonl, write_json
from loralab.layout import PREDICTIONS, TARGET_METRICS, RunDir
from loralab.scoring import generic, tag_scores
from loralab.scoring.stats import bootstrap_ci

KINDS = ("base", "adapter", "reference")
# Config keys copied from an adapter run's config.yaml into metrics.json["hyperparams"].
HYPERPARAM_KEYS = ("lora.r", "lora.alpha", "train.lr", "data.limit", "train.epochs",
                   "train.max_steps")
_HEADLINES = {"tag_scores": tag_scores.HEADLINE, "generic": generic.HEADLINE}
_RECORD_FIELDS = {"tag_scores": tag_scores.RECORD_FIELDS, "generic": generic.RECORD_FIELDS}


class Task(Protocol):
    """What `loralab eval` and `loralab report` need from a task."""

    name: str
    headline: list[str]
    predict_shows_parsed: bool  # `loralab predict` adds the parse to each row

    def parse(self, text: str) -> Any: ...

    def reference_predictors(self, train_answers: list[str]) -> dict[str, Callable[[dict], str]]:
        """No-model predictors (name → record → answer text) built from the training answers."""

    def score(self, generation: str, reference: str) -> dict[str, Any]: ...

    def aggregate(self, rows: list[dict]) -> dict[str, Any]: ...

    def higher_is_better(self, metric: str) -> bool: ...


def get_task(eval_cfg: Any) -> Task:
    """The task named by `eval.task`, configured from the other eval keys."""
    if eval_cfg.task == "tag_scores":
        return tag_scores.TagScoresTask(
            tags=list(eval_cfg.tags),
            score_min=eval_cfg.score_min,
            score_max=eval_cfg.score_max,
            tolerance=eval_cfg.tolerance,
        )
    if eval_cfg.task == "generic":
        return generic.GenericTask()
    raise UserError(f"eval.task must be one of {', '.join(_HEADLINES)}; got {eval_cfg.task!r}")


def headline_metrics(task_name: str) -> list[str]:
    """The metrics a report shows for a task, by name (no config needed)."""
    if task_name not in _HEADLINES:
        raise UserError(f"unknown task {task_name!r} in metrics.json")
    return list(_HEADLINES[task_name])


def higher_is_better(metric: str) -> bool:
    return metric not in tag_scores.LOWER_IS_BETTER


def record_values(task_name: str, rows: list[dict], metric: str) -> list[float]:
    """Per-record values whose mean is the aggregate `metric` (valid_rate ← `valid`, ...)."""
    field = _RECORD_FIELDS.get(task_name, {}).get(metric, metric)
    try:
        return [float(row[field]) for row in rows]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"predictions lack a numeric per-record {field!r} field") from None


def score_predictions(
    task: Task, rows: list[dict], bootstrap: int = 1000, seed: int = 0
) -> tuple[list[dict], dict]:
    """Score rows holding `generation` and `reference`; returns (scored rows, metrics).

    The metrics carry the aggregates, `task`, `n`, `ci` of the headline metrics (seeded
    bootstrap; omitted when bootstrap is 0) and `finished_rate` when rows carry `finished`.
    """
    scored = []
    for i, row in enumerate(rows, 1):
        if "generation" not in row or "reference" not in row:
            raise UserError(f"record {i}: needs 'generation' and 'reference' to be scored")
        try:
            metrics = task.score(str(row["generation"]), str(row["reference"]))
        except UserError as exc:
            raise UserError(f"record {i}: {exc}") from None
        scored.append({**row, **metrics})
    out: dict[str, Any] = {"task": task.name, **task.aggregate(scored)}
    if bootstrap > 0 and scored:
        out["ci"] = {
            m: list(bootstrap_ci(record_values(task.name, scored, m), n=bootstrap, seed=seed))
            for m in task.headline
        }
    if scored and all("finished" in r for r in scored):
        out["finished_rate"] = sum(bool(r["finished"]) for r in scored) / len(scored)
    return scored, out


def write_target_results(folder: Path, rows: list[dict], metrics: dict) -> Path:
    """Write predictions.jsonl and metrics.json (each atomically) into `folder`."""
    missing = [k for k in ("target", "kind", "task", "n") if k not in metrics]
    if missing:
        raise ValueError(f"metrics lack {', '.join(missing)}")
    if metrics["kind"] not in KINDS:
        raise ValueError(f"metrics kind must be one of {KINDS}, got {metrics['kind']!r}")
    folder = Path(folder)
    lines = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
    atomic_write_text(folder / PREDICTIONS, lines)
    write_json(folder / TARGET_METRICS, metrics)
    return folder


def read_target(folder: Path) -> tuple[dict, list[dict]]:
    """(metrics, rows) of an evaluated target; one-line UserError when files are missing/bad."""
    folder = Path(folder)
    metrics_path, preds_path = folder / TARGET_METRICS, folder / PREDICTIONS
    for path in (metrics_path, preds_path):
        if not path.is_file():
            raise UserError(f"{path} not found: evaluate that target first (loralab eval)")
    try:
        metrics = read_json(metrics_path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{metrics_path} is not valid JSON: {exc}") from None
    if not isinstance(metrics, dict):
        raise UserError(f"{metrics_path} must hold a JSON object")
    missing = [k for k in ("target", "kind", "task", "n") if k not in metrics]
    if missing:
        raise UserError(f"{metrics_path} lacks {', '.join(missing)}")
    rows = read_jsonl(preds_path)
    if len(rows) != metrics["n"] or not all(isinstance(r, dict) for r in rows):
        raise UserError(
            f"{preds_path} has {len(rows)} readable rows but {metrics_path.name} says n={metrics['n']}"
        )
    return metrics, rows


def hyperparams_from_run(run_dir: Path) -> dict[str, Any]:
    """The HYPERPARAM_KEYS values of a run's config.yaml (None where absent)."""
    raw = read_yaml_mapping(RunDir(run_dir).config)
    return {key: get_dotted(raw, key) for key in HYPERPARAM_KEYS}
