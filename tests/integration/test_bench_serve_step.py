"""bench/serve_step.py --smoke: the engine-alone benchmark's whole path on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_engine_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'bench'}",
           "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "serve_step.py"), "--smoke",
                           "--budgets", "16,48", "--overlap", "--unfused-too", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    files = list((out / "serve_step").glob("*.json"))
    assert len(files) == 1, files
    rows = json.loads(files[0].read_text())["rows"]
    overlapped = [r for r in rows if r.get("mode") == "overlapped"]
    unfused = [r for r in rows if r.get("fused_shrinks") is False]
    rows = [r for r in rows if r.get("mode") != "overlapped" and r.get("fused_shrinks")]
    assert [r["budget"] for r in unfused] == [16, 48]
    assert [r["budget"] for r in rows] == [16, 48] == [r["budget"] for r in overlapped]
    # the scheduler's loop (launch k+1, collect k) makes tokens too; its sync check is CUDA's
    assert all(r["new_tokens_per_s"] > 0 and r["host_ms_per_step"]["launch"] > 0
               and set(r["host_ms_per_step"]) == {"free", "begin", "launch", "collect"}
               for r in overlapped)
    assert {r["sync_in_launch"] for r in overlapped} == {"not checked (CUDA only)"}
    for row in rows:
        assert row["new_tokens_per_s"] > 0 and row["mixed_steps"] > 0
        # every mixed step feeds at most its budget; the smoke prompts (20-60 tokens) need
        # several steps at 16 tokens, so the mean fills that budget whole
        assert 0 < row["mixed_prompt_tokens"] <= row["budget"]
        assert 0 <= row["mixed_decode_rows"] <= row["rows"]
    assert rows[0]["mixed_prompt_tokens"] == 16
