"""A hand-made sweep with evaluated trials, a base model and reference predictors on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from loralab.config import SEED_TAGS, Config, EvalConfig, save_config
from loralab.layout import ComparisonDir
from loralab.scoring.references import score_references
from loralab.scoring.tasks import (
    get_task,
    hyperparams_from_run,
    score_predictions,
    write_target_results,
)

N_RECORDS = 16


def truths(seed: int = 0) -> list[dict[str, int]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(N_RECORDS):
        scores = dict.fromkeys(SEED_TAGS, 0)
        for tag in rng.choice(SEED_TAGS, size=3, replace=False):
            scores[str(tag)] = int(rng.integers(1, 11))
        out.append(scores)
    return out


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def evaluate_target(folder: Path, name: str, kind: str, generations: list[str],
                    run_dir: Path | None = None) -> Path:
    refs = [dumps(t) for t in truths()]
    rows = [{"input": f"article {i}", "reference": r, "generation": g, "finished": True}
            for i, (r, g) in enumerate(zip(refs, generations, strict=True))]
    scored, metrics = score_predictions(get_task(EvalConfig()), rows, bootstrap=200, seed=0)
    metrics = {"target": name, "kind": kind, "run_dir": str(run_dir) if run_dir else None,
               **metrics,
               "hyperparams": hyperparams_from_run(run_dir) if run_dir else {},
               "gen": {"new_tokens": 60 * N_RECORDS, "seconds": 2.0, "tokens_per_s": 30 * N_RECORDS}}
    return write_target_results(folder, scored, metrics)


def make_run(sweep: Path, name: str, r: int, lr: float, generations: list[str]) -> Path:
    run = sweep / name
    cfg = Config()
    cfg.lora.r, cfg.train.lr = r, lr
    save_config(cfg, run / "config.yaml")
    return evaluate_target(run / "eval", name, "adapter", generations, run_dir=run)


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    """A fresh sweep tree per test (tests may damage it)."""
    return make_sweep(tmp_path / "sweep")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    """(comparison folder, build result) of one report shared by read-only tests."""
    from loralab.report.build import report_from_dir

    comp = make_sweep(tmp_path_factory.mktemp("built") / "sweep") / "comparison"
    return comp, report_from_dir(comp)


def make_sweep(sweep: Path) -> Path:
    """sweep/ with sweep.json, two evaluated trials (one not), and comparison/ (base + refs)."""
    gold = truths()
    good = [dumps(t) for t in gold]
    good[3] = dumps({**gold[3], "其他": gold[3]["其他"] + 1})
    weak = [dumps({**dict.fromkeys(SEED_TAGS, 0), "商业案例": t["商业案例"]}) for t in gold]
    evals = [make_run(sweep, "r8-lr1e-4", 8, 1e-4, good),
             make_run(sweep, "r16-lr1e-3", 16, 1e-3, weak)]
    (sweep / "r4-lr1e-2").mkdir()  # a trial that has not been evaluated
    trials = [{"path": p} for p in ("r8-lr1e-4", "r16-lr1e-3", "r4-lr1e-2")]
    (sweep / "sweep.json").write_text(json.dumps({"trials": trials}))
    comp = sweep / "comparison"
    base = evaluate_target(comp / "base", "base", "base", ["标签: 0.0 其他 其他"] * N_RECORDS)
    train = [dumps(t) for t in truths(seed=1)]
    eval_rows = [{"input": f"article {i}", "reference": dumps(t)} for i, t in enumerate(gold)]
    refs = score_references(EvalConfig(), train, eval_rows, comp, bootstrap=200)
    ComparisonDir(comp).write_targets([base, *refs, *evals])
    return sweep
