"""bench/serve_load.py --smoke: the GPU benchmark's whole path on the CPU with a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_the_load_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "serve_load.py"), "--smoke",
                           "--seconds", "0.6", "--naive-seconds", "0.6", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    files = list((out / "serve_load").glob("*.json"))
    assert len(files) == 1, files
    result = json.loads(files[0].read_text())
    runs = result["rows"]
    assert [(r["engine"], r["mix"], r["clients"]) for r in runs] == [
        ("continuous", "one", 4), ("continuous", "one", 16), ("continuous", "four", 4),
        ("continuous", "four", 16), ("naive", "one", 4)]
    assert all(r["tokens_per_s"] > 0 and not r["errors"] and r["requests"] > 0 for r in runs)
    assert all(r["ttft_p50_s"] is not None for r in runs)
    assert result["summary"]["over_naive_4_clients"] > 0
    assert {"commit", "date", "hardware", "versions"} <= set(result)
    assert result["summary"]["engine_stats"][0]["decode_steps"] > 0
