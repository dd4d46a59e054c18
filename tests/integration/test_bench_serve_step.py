"""bench/serve_step.py --smoke: the engine-alone benchmark's whole path on the CPU."""

from __future__ import annotations

import json


def test_the_engine_benchmark_runs_on_cpu(tmp_path, run_bench):
    path = run_bench("serve_step", "--smoke", "--budgets", "16,48", "--overlap",
                     "--unfused-too", out=tmp_path / "results")
    rows = json.loads(path.read_text())["rows"]
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
