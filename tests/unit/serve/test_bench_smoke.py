"""bench/serve_load.py --smoke: the GPU benchmark's whole path on the CPU with a tiny model."""

from __future__ import annotations

import json


def test_the_load_benchmark_runs_on_cpu(tmp_path, run_bench):
    path = run_bench("serve_load", "--smoke", "--seconds", "0.6", "--naive-seconds", "0.6",
                     out=tmp_path / "results")
    result = json.loads(path.read_text())
    runs = result["rows"]
    assert [(r["engine"], r["mix"], r["clients"]) for r in runs] == [
        ("continuous", "one", 4), ("continuous", "one", 16), ("continuous", "four", 4),
        ("continuous", "four", 16), ("naive", "one", 4)]
    assert all(r["tokens_per_s"] > 0 and not r["errors"] and r["requests"] > 0 for r in runs)
    assert all(r["ttft_p50_s"] is not None for r in runs)
    assert result["summary"]["over_naive_4_clients"] > 0
    assert {"commit", "date", "hardware", "versions"} <= set(result)
    assert result["summary"]["engine_stats"][0]["decode_steps"] > 0
