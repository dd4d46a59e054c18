"""The seed's rank study on the real Qwen2.5-Coder-0.5B, packed or sequential (issue 13).

`run`: one `loralab sweep bench/configs/rank_study_05b.yaml` in the given sweep.mode on the
~1,450 course-like records (4 epochs, effective batch 16, r 4/8/16/32), timed from the command's
start to its end (the makespan: model load and compilation included), then `loralab eval` of
every trial on the bundled eval set. Writes OUT/real_rank_study/<date>_<commit>_<hw>.json with
per-trial wall and training seconds, the sequential trials' steady-state estimate (their steps
× the median step time from step 6 on) and each trial's headline metrics with bootstrap CIs.

`compare`: reads a packed and a sequential file and prints, per trial and headline metric,
both values with their 95% intervals and whether the intervals overlap.

    PYTHONPATH=src:bench python bench/rank_study.py run --mode packed --model /tmp/qwen05 --out $OUT
    python bench/rank_study.py compare PACKED.json SEQUENTIAL.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from loralab.scoring.tag_scores import HEADLINE  # the eval report's headline metrics

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIG = HERE / "configs" / "rank_study_05b.yaml"
DATA = HERE / "data" / "records1447.json"
EVAL_DATA = ROOT / "src" / "loralab" / "resources" / "data" / "tag_scores_eval.json"
WARM_STEPS = 5  # steps left out of the steady-state median (compilation, allocator warm-up)


def timed(cmd: list[str], log: Path) -> float:
    """Run cmd with its output in `log` (and echoed); its wall seconds. A failure stops here."""
    started = time.perf_counter()
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sink.write(line)
            print(line, end="", flush=True)
    if proc.wait() != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} … failed (rc {proc.returncode}); see {log}")
    return time.perf_counter() - started


def trial_rows(sweep: Path) -> list[dict]:
    """Per trial: timings from sweep.json and metrics.jsonl, eval metrics from eval/."""
    rows = []
    for trial in json.loads((sweep / "sweep.json").read_text())["trials"]:
        result, run = trial.get("result") or {}, Path(trial["path"])
        steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        times = [s["step_seconds"] for s in steps[WARM_STEPS:] if "step_seconds" in s]
        row = {"trial": trial["name"], "status": trial["status"],
               "overrides": trial.get("overrides"), "steps": result.get("steps"),
               "final_loss": result.get("final_loss"),
               "wall_seconds": result.get("wall_seconds"),
               "train_seconds": result.get("train_seconds"),
               "tokens_per_s": result.get("tokens_per_s")}
        if times:  # sequential trials time their own steps; packed ones share a pass
            steady = statistics.median(times) * len(steps)
            row.update(steady_seconds=round(steady, 2),
                       wall_over_steady=round(result["wall_seconds"] / steady, 3))
        metrics_file = run / "eval" / "metrics.json"
        if metrics_file.is_file():
            m = json.loads(metrics_file.read_text())
            row["metrics"] = {k: m.get(k) for k in HEADLINE}
            row["ci"] = {k: m.get("ci", {}).get(k) for k in HEADLINE}
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> None:
    from record import write_run

    work = Path(args.work) / args.mode
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.parent.mkdir(parents=True, exist_ok=True)
    logs = Path(args.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "loralab.cli"]
    makespan = timed([*cli, "sweep", str(CONFIG), f"sweep.mode={args.mode}",
                      f"model.path={args.model}", f"data.path={DATA}", f"output_dir={work}",
                      *args.set],
                     logs / f"sweep_{args.mode}.log")
    eval_s = timed([*cli, "eval", "--adapters", str(work), "--data", str(EVAL_DATA),
                    "--out", str(work / "comparison")], logs / f"eval_{args.mode}.log")
    rows = trial_rows(work)
    summary = {"mode": args.mode, "makespan_s": round(makespan, 1), "eval_s": round(eval_s, 1),
               "goal_makespan_s": 120 if args.mode == "packed" else None,
               "baseline_makespan_s": 389}
    config = {"model": args.model, "config": str(CONFIG.relative_to(ROOT)),
              "data": str(DATA.relative_to(ROOT)), "eval_data": str(EVAL_DATA.relative_to(ROOT)),
              "sweep_mode": args.mode, "overrides": args.set}
    for r in rows:
        print(json.dumps(r))
    print(json.dumps(summary))
    print("→", write_run(Path(args.out), "real_rank_study", config=config, rows=rows,
                         summary=summary, commit=args.commit))


def compare(args: argparse.Namespace) -> None:
    a, b = (json.loads(Path(f).read_text()) for f in (args.packed, args.sequential))
    seq = {r["trial"]: r for r in b["rows"]}
    print(f"makespan: {a['summary']['mode']} {a['summary']['makespan_s']} s, "
          f"{b['summary']['mode']} {b['summary']['makespan_s']} s")
    agree = total = 0
    for r in a["rows"]:
        other = seq.get(r["trial"])
        if not other or "metrics" not in r or "metrics" not in other:
            print(f"{r['trial']}: missing on one side")
            continue
        for k in HEADLINE:
            (lo1, hi1), (lo2, hi2) = r["ci"][k], other["ci"][k]
            overlap = lo1 <= hi2 and lo2 <= hi1
            agree, total = agree + overlap, total + 1
            print(f"{r['trial']:24s} {k:18s} {r['metrics'][k]:.4f} [{lo1:.4f}, {hi1:.4f}]  "
                  f"{other['metrics'][k]:.4f} [{lo2:.4f}, {hi2:.4f}]  "
                  f"{'overlap' if overlap else 'DISJOINT'}")
    print(f"{agree}/{total} metric intervals overlap")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--mode", choices=("packed", "sequential"), required=True)
    r.add_argument("--model", default="/tmp/qwen05")
    r.add_argument("--out", required=True)
    r.add_argument("--work", default="/tmp/rank05b")
    r.add_argument("--commit")
    r.add_argument("--set", nargs="*", default=[], help="more a.b=value overrides (smoke runs)")
    c = sub.add_parser("compare")
    c.add_argument("packed")
    c.add_argument("sequential")
    args = parser.parse_args()
    run(args) if args.command == "run" else compare(args)


if __name__ == "__main__":
    main()
