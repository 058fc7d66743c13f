"""The benchmark in its quick mode: the JSON summary line and the same-math check, not the timings."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_quick_benchmark_reports_json(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("train_speedup", "preprocess_speedup", "eval_speedup", "peak_rss_mb"):
        assert summary[key] > 0, key
    assert summary["correctness_passed"] is True
    check = summary["report"]["train"]["check"]["float64"]
    assert max(check["max_grad_rel_error"].values()) < 1e-9
    assert max(check["max_update_rel_error"].values()) < 1e-9
    assert "same math check" in result.stdout
    levers = summary["report"]["train"]["rates"]
    assert {"pixelda default", "notebook loop (baseline)", "pixelda, every lever off", "+ bf16 autocast"} <= set(levers)
