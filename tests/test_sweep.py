"""Optuna sweeps through Hydra multirun, run as a user runs them, with real SQLite stores."""

from __future__ import annotations

import os
import subprocess
import sys

import optuna
import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY, run_cli

EXPERIMENT = "sweep_loss_weights"


@pytest.fixture
def sweep_args(tmp_path):
    """A tiny loss-weight sweep writing its study, MLflow store and outputs under tmp_path."""
    return ["--multirun", "sweep=loss_weights", *TINY,
            f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db", "hydra.sweeper.study_name=test_study",
            f"tracking.uri=sqlite:///{tmp_path}/mlruns/mlflow.db", f"hydra.sweep.dir={tmp_path}/sweep"]


def load_study(tmp_path) -> optuna.Study:
    return optuna.load_study(study_name="test_study", storage=f"sqlite:///{tmp_path}/optuna.db")


def runs_of(tmp_path) -> tuple[MlflowClient, list, list]:
    """The client, the parent runs and the child runs of the sweep experiment."""
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("pixelda.sweep_parent") == "true"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_four_trial_sweep(tmp_path, cache_dir, sweep_args):
    result = run_cli("pixelda.train", *sweep_args, "hydra.sweeper.n_trials=4", cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr

    study = load_study(tmp_path)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    for trial in study.trials:
        assert 0.013 <= trial.params["loss.alpha"] <= 1.3
        assert 0.001 <= trial.params["loss.beta"] <= 0.1
        assert 0.0011 <= trial.params["loss.g_loss_weight"] <= 0.11

    client, parents, children = runs_of(tmp_path)
    assert len(parents) == 1
    assert len(children) == 4
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(int(c.data.tags["optuna.trial_number"]) for c in children) == [0, 1, 2, 3]
    assert {c.data.tags["optuna.study_name"] for c in children} == {"test_study"}
    for child in children:
        trial = study.trials[int(child.data.tags["optuna.trial_number"])]
        assert child.data.metrics["val/best_target_acc"] == trial.value
        assert float(child.data.params["loss.alpha"]) == pytest.approx(trial.params["loss.alpha"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best/value"] == study.best_value
    assert parent.data.metrics["best/loss.alpha"] == pytest.approx(study.best_params["loss.alpha"])
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")}
    assert plots == {"optuna/optimization_history.png", "optuna/param_importances.png"}


def test_resumed_sweep_continues_numbering(tmp_path, cache_dir, sweep_args):
    first = run_cli("pixelda.train", *sweep_args, "hydra.sweeper.n_trials=2", cwd=tmp_path, cache_dir=cache_dir)
    assert first.returncode == 0, first.stderr
    again = run_cli("pixelda.train", *sweep_args, "hydra.sweeper.n_trials=2", cwd=tmp_path, cache_dir=cache_dir)
    assert again.returncode == 0, again.stderr

    study = load_study(tmp_path)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    _, parents, children = runs_of(tmp_path)
    assert len(parents) == 1, "the resumed sweep opened a second parent run"
    assert sorted(int(c.data.tags["optuna.trial_number"]) for c in children) == [0, 1, 2, 3]


def test_two_concurrent_workers(tmp_path, cache_dir, sweep_args):
    env = {**os.environ, "PIXELDA_CACHE_DIR": str(cache_dir)}
    workers = [
        subprocess.Popen([sys.executable, "-m", "pixelda.train", *sweep_args, "hydra.sweeper.n_trials=2",
                          f"hydra.sweep.dir={tmp_path}/sweep{i}"], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output

    study = load_study(tmp_path)
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 4, "two trials had the same params"

    client, parents, children = runs_of(tmp_path)
    assert len(parents) == 1
    assert len(children) == 4
    assert sorted(int(c.data.tags["optuna.trial_number"]) for c in children) == [0, 1, 2, 3]
    for child in children:
        assert child.info.status == "FINISHED"
        assert len(client.get_metric_history(child.info.run_id, "train/loss_d")) == 2  # log_every=1, 2 steps
        assert "val/target_acc" in child.data.metrics


def test_failing_trial_leaves_sweep_alive(tmp_path, cache_dir, sweep_args):
    # a search over two learning rates: 1e30 makes the losses non-finite, 1e-3 trains normally
    args = sweep_args + ["hydra.sweeper.params=null", "optimizer.lr=choice(1e30,0.001)", "train.max_steps=6",
                         "hydra.sweeper.n_trials=4"]
    result = run_cli("pixelda.train", *args, cwd=tmp_path, cache_dir=cache_dir)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output

    study = load_study(tmp_path)
    assert len(study.trials) == 4  # the sweep went on after the failures
    states = {(t.params["optimizer.lr"], t.state) for t in study.trials}
    # the per-trial seeds of seed 0 draw both learning rates among the 4 trials
    assert states == {(1e30, optuna.trial.TrialState.FAIL), (0.001, optuna.trial.TrialState.COMPLETE)}
    assert "non-finite" in output  # the reason is logged
    failed = sum(t.state == optuna.trial.TrialState.FAIL for t in study.trials)
    _, parents, children = runs_of(tmp_path)
    assert sorted(c.info.status for c in children) == ["FAILED"] * failed + ["FINISHED"] * (4 - failed)
    assert parents[0].data.metrics["trials/fail"] == failed


def test_early_stop_at_chance(tmp_path, cache_dir):
    result = run_cli("pixelda.train", *TINY, "train.max_steps=null", "train.epochs=5", "train.stop_if_chance_after=1",
                     "train.chance_accuracy=100", f"tracking.uri=sqlite:///{tmp_path}/mlruns/mlflow.db",
                     f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr
    assert "stopping early: target validation is still at chance" in result.stdout + result.stderr
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("pixelda").experiment_id])[0]
    assert run.data.tags["pixelda.stopped_by"] == "train.stop_if_chance_after"
    assert len(client.get_metric_history(run.info.run_id, "val/target_acc")) == 1


def test_summary_sorts_by_objective(tmp_path, cache_dir, sweep_args):
    swept = run_cli("pixelda.train", *sweep_args, "hydra.sweeper.n_trials=3", cwd=tmp_path, cache_dir=cache_dir)
    assert swept.returncode == 0, swept.stderr
    result = run_cli("pixelda.summary", f"experiment={EXPERIMENT}", f"uri=sqlite:///{tmp_path}/mlruns/mlflow.db",
                     "format=markdown", cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert "3 runs in 3 configurations" in lines[0]
    header = [c.strip() for c in lines[1].strip("|").split("|")]
    assert header[:2] == ["rank", "val best %"]
    assert header[4:] == ["runs", "loss.alpha", "loss.beta", "loss.g_loss_weight"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[3:]]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    values = [float(r[1]) for r in rows]
    assert values == sorted(values, reverse=True)
    study = load_study(tmp_path)
    assert values[0] == pytest.approx(study.best_value, abs=0.01)


def test_summary_groups_seeds(tmp_path, cache_dir):
    args = ["--multirun", *TINY, "seed=0,1", "loss.alpha=0.1,0.2", f"tracking.uri=sqlite:///{tmp_path}/mlruns/mlflow.db",
            "tracking.experiment=seeds", f"hydra.sweep.dir={tmp_path}/sweep"]
    assert run_cli("pixelda.train", *args, cwd=tmp_path, cache_dir=cache_dir).returncode == 0
    result = run_cli("pixelda.summary", "experiment=seeds", f"uri=sqlite:///{tmp_path}/mlruns/mlflow.db", "format=markdown",
                     cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr
    assert "4 runs in 2 configurations" in result.stdout
    table = [line for line in result.stdout.splitlines() if line.startswith("| ") and "rank" not in line]
    assert len(table) == 2
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[4] == "2"  # runs
        assert "+-" in cells[1]  # mean +- std over the two seeds

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("seeds").experiment_id])
    for alpha in ("0.1", "0.2"):
        values = [r.data.metrics["val/best_target_acc"] for r in runs if r.data.params["loss.alpha"] == alpha]
        mean = sum(values) / 2
        assert any(f"{mean:.2f} +-" in line for line in table)
