"""Beyond one machine, with real servers on 127.0.0.1: an Optuna study in PostgreSQL, an MLflow
tracking server, and trials launched through submitit's local executor.

The servers are started by the fixtures; the tests are skipped when PostgreSQL's initdb or the mlflow
command is missing (.ci/run installs both).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY, compose_config, run_cli

pytestmark = pytest.mark.server


def skip_or_fail(reason: str) -> None:
    """Skip, unless PIXELDA_REQUIRE_SERVERS is set (as .ci/run does), where a missing server is a failure."""
    if os.environ.get("PIXELDA_REQUIRE_SERVERS"):
        pytest.fail(f"{reason}, but PIXELDA_REQUIRE_SERVERS is set")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_binary(name: str):
    """Path of a PostgreSQL server program: on PATH, or where Debian's packages put it."""
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return shutil.which(name) or (candidates[-1] if candidates else None)


@pytest.fixture(scope="module")
def postgres_url():
    """Start a throwaway PostgreSQL cluster on 127.0.0.1 and return the URL of a fresh database."""
    initdb, pg_ctl = postgres_binary("initdb"), postgres_binary("pg_ctl")
    if not initdb or not pg_ctl:
        skip_or_fail("PostgreSQL server binaries (initdb, pg_ctl) not found")
    folder = Path(tempfile.mkdtemp(prefix="pixelda-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        if shutil.which("runuser") is None:
            skip_or_fail("running as root without runuser to start PostgreSQL as another user")
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "postgres"], check=True, capture_output=True)
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start"],
                   check=True, capture_output=True)
    try:
        subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c", "CREATE DATABASE optuna"],
                       check=True, capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """Start `mlflow server` on 127.0.0.1 with its own SQLite store and artifact folder."""
    mlflow = Path(sys.executable).with_name("mlflow")
    if not mlflow.exists():
        skip_or_fail("the mlflow command is not installed next to this Python")
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    server = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{folder}/server.db",
                               "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(1)
    else:
        server.terminate()
        pytest.fail("mlflow server did not answer /health within 120 s")
    yield url
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()


def test_slurm_launcher_config_composes():
    from hydra import compose, initialize_config_dir

    from conftest import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR)):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "sweep=loss_weights"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.timeout_min > 0
    assert launcher.cpus_per_task >= 1
    assert cfg.hydra.sweeper._target_ == "pixelda.sweeper.PixelDASweeper"
    assert compose_config(["sweep=loss_weights"]).tracking.experiment == "sweep_loss_weights"


def test_sweep_across_shared_servers(tmp_path, cache_dir, postgres_url, mlflow_server):
    args = ["--multirun", "sweep=loss_weights", *TINY, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
            f"hydra.sweeper.storage={postgres_url}", "hydra.sweeper.study_name=cluster", "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=2", f"tracking.uri={mlflow_server}", f"hydra.sweep.dir={tmp_path}/sweep0"]
    env = {**os.environ, "PIXELDA_CACHE_DIR": str(cache_dir)}
    # two workers share the study, as two machines would
    workers = [subprocess.Popen([sys.executable, "-m", "pixelda.train", *args[:-1], f"hydra.sweep.dir={tmp_path}/sweep{i}"],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
    outputs = [w.communicate(timeout=900)[0] for w in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output

    study = optuna.load_study(study_name="cluster", storage=postgres_url)
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("sweep_loss_weights")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("pixelda.sweep_parent") == "true"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1
    assert sorted(int(c.data.tags["optuna.trial_number"]) for c in children) == [0, 1, 2, 3]
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        # artifacts went through the server to its artifact folder
        assert {a.path for a in client.list_artifacts(child.info.run_id, "checkpoints")} == {"checkpoints/best.pt", "checkpoints/last.pt"}
    assert (tmp_path / "sweep0" / ".submitit").is_dir()


def test_train_against_mlflow_server(tmp_path, cache_dir, mlflow_server):
    result = run_cli("pixelda.train", *TINY, f"tracking.uri={mlflow_server}", "tracking.experiment=server_run",
                     f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr
    client = MlflowClient(mlflow_server)
    run = client.search_runs([client.get_experiment_by_name("server_run").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert "val/target_acc" in run.data.metrics
    assert client.list_artifacts(run.info.run_id, "figures")
