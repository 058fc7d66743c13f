"""The benchmark in its quick mode: the JSON summary line and the same-math check, not the timings."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import REPO, compose_config


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
    evaluations = summary["report"]["eval"]["rates"]
    assert {"pixelda default", "DataLoader loop (baseline)", "+ pooling without indices", "default without channels_last"} <= set(evaluations)
    # the same fp32 convolutions with either pooling give the same predictions
    assert evaluations["+ pooling without indices"]["accuracy"] == evaluations["pixelda, every lever off"]["accuracy"]


def load_ablation():
    spec = importlib.util.spec_from_file_location("ablation", REPO / "benchmarks" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", list(load_ablation().ROWS))
def test_ablation_row_composes(name, tmp_path):
    ablation = load_ablation()
    overrides = ablation.row_overrides(name, ablation.ROWS[name][0], 0, str(tmp_path), 1.0, "sqlite:///x.db")
    cfg = compose_config([o for o in overrides if not o.startswith("hydra.")])
    assert cfg.tracking.run_name == name
    assert cfg.train.max_minutes == 1.0


def test_cosine_row_ends_within_budget():
    ablation = load_ablation()
    name = next(n for n in ablation.ROWS if "cosine" in n)
    for minutes in (15, 60):
        overrides = ablation.row_overrides(name, ablation.ROWS[name][0], 0, "data", minutes, "sqlite:///x.db")
        cfg = compose_config([o for o in overrides if not o.startswith("hydra.")])
        assert cfg.train.lr_schedule == "cosine"
        # The schedule reaches 0 at max_steps, which comes before the budget at the measured rate.
        assert cfg.train.max_steps == minutes * ablation.STEPS_PER_MINUTE


def test_ablation_runs_one_row(shared_data, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    command = [sys.executable, str(REPO / "benchmarks" / "ablation.py"), "--data-root", str(shared_data),
               "--minutes", "0.05", "--seeds", "0", "--only", "(base)", "--uri", uri, "--output-dir", str(tmp_path / "runs")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "failed" not in result.stdout, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("| G and D with 32 filters (base)"))
    assert "| 1 |" in row
    assert "not run" not in row
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert int(cells[4].replace(",", "")) > 0
