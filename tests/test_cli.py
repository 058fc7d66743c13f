"""The entry points as a user runs them: bad input, Ctrl-C and resume, evaluate's JSON line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import TINY, run_cli, small_protocol_overrides, write_mnist_folder, write_mnistm_folder
from pixelda.checkpoint import load_checkpoint
from pixelda.config import key_reference


@pytest.fixture
def cli_overrides(tmp_path, cache_dir):
    return TINY + [f"tracking.uri=sqlite:///{tmp_path}/mlruns/mlflow.db", f"hydra.run.dir={tmp_path}/run"]


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    for fragment in fragments:
        assert fragment in output, output


def test_train_help_lists_key_meanings(tmp_path, cache_dir):
    result = run_cli("pixelda.train", "--help", cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "model: resnet3, resnet6, tiny" in lines
    # each key is followed by the first paragraph of its docstring in pixelda/config.py
    for key, meaning in key_reference():
        assert key in lines, key
        following = " ".join(line.strip() for line in lines[lines.index(key) + 1:lines.index(key) + 4])
        assert following.startswith(meaning[:60]), key
    assert "loss.g_loss_weight" in lines
    assert "Warning" not in result.stderr, result.stderr


def test_train_cli_writes_run(tmp_path, cache_dir, cli_overrides):
    result = run_cli("pixelda.train", "model=resnet6", "loss.alpha=0.13", *cli_overrides[1:], "train.max_steps=1",
                     cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("pixelda").experiment_id])[0]
    assert run.info.run_name.startswith("model=resnet6,loss.alpha=0.13")
    assert {a.path for a in client.list_artifacts(run.info.run_id, "hydra")} >= {"hydra/config.yaml", "hydra/overrides.yaml"}


def test_missing_data_folder(tmp_path, cache_dir):
    result = run_cli("pixelda.train", "data=mnist_mnistm_small", "data.root=/no/such/folder", cwd=tmp_path, cache_dir=cache_dir)
    assert_user_error(result, "/no/such/folder", "set data.root")


def test_labels_name_missing_png(tmp_path, cache_dir, cli_overrides):
    root = tmp_path / "data"
    write_mnist_folder(root / "MNIST" / "raw", count=40)
    write_mnistm_folder(root / "mnist_m", count=40)
    (root / "mnist_m" / "mnist_m_test" / "00000007.png").unlink()
    result = run_cli("pixelda.train", *cli_overrides, *small_protocol_overrides(root), cwd=tmp_path, cache_dir=cache_dir)
    assert_user_error(result, "00000007.png", "extract the MNIST-M archive again")


def test_truncated_idx(tmp_path, cache_dir, cli_overrides):
    root = tmp_path / "data"
    write_mnist_folder(root / "MNIST" / "raw", count=40, gz=False)
    write_mnistm_folder(root / "mnist_m", count=40)
    images = root / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    result = run_cli("pixelda.train", *cli_overrides, *small_protocol_overrides(root), cwd=tmp_path, cache_dir=cache_dir)
    assert_user_error(result, "truncated IDX file", "t10k-images-idx3-ubyte", "fetch it again")


def test_unknown_model(tmp_path, cache_dir):
    result = run_cli("pixelda.train", "model=resnet99", cwd=tmp_path, cache_dir=cache_dir)
    assert_user_error(result, "resnet99", "resnet6", "conf/model/")
    assert result.returncode == 2


def test_negative_loss_weight(tmp_path, cache_dir):
    result = run_cli("pixelda.train", "loss.alpha=-0.1", cwd=tmp_path, cache_dir=cache_dir)
    assert_user_error(result, "loss.alpha=-0.1", ">= 0")
    assert result.returncode == 2


def test_checkpoint_from_other_model_size(tmp_path, cache_dir, cli_overrides):
    first = run_cli("pixelda.train", *cli_overrides, cwd=tmp_path, cache_dir=cache_dir)
    assert first.returncode == 0, first.stderr
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    result = run_cli("pixelda.train", *cli_overrides, "model=resnet3", f"train.resume={checkpoint}",
                     f"hydra.run.dir={tmp_path}/run2", cwd=tmp_path, cache_dir=cache_dir)
    assert_user_error(result, "model=tiny", "model=resnet3", str(checkpoint))


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_and_resumes(tmp_path, cache_dir, cli_overrides, signum, status):
    overrides = [o for o in cli_overrides if not o.startswith("train.max_steps")] + ["train.epochs=1000"]
    env_cmd = [sys.executable, "-m", "pixelda.train", *overrides]
    import os

    env = {**os.environ, "PIXELDA_CACHE_DIR": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(env_cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # wait until training has logged a few steps, then press Ctrl-C
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    deadline = time.time() + 240
    run = None
    while time.time() < deadline:
        time.sleep(1)
        try:
            runs = client.search_runs([client.get_experiment_by_name("pixelda").experiment_id])
        except Exception:  # the store or the experiment does not exist yet
            continue
        if runs and len(client.get_metric_history(runs[0].info.run_id, "train/loss_t")) >= 3:
            run = runs[0]
            break
    assert run is not None, "training did not start"
    process.send_signal(signum)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == status, output
    assert "Traceback" not in output, output
    assert "resume with" in output

    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    assert checkpoint.is_file()
    assert client.get_run(run.info.run_id).info.status == "KILLED"

    from pixelda.checkpoint import load_checkpoint

    stopped_at = load_checkpoint(checkpoint)["step"]
    assert stopped_at >= 3
    resumed = run_cli("pixelda.train", *overrides, f"train.max_steps={stopped_at + 2}", f"train.resume={checkpoint}",
                      f"hydra.run.dir={tmp_path}/run2", cwd=tmp_path, cache_dir=cache_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(tmp_path / "run2" / "checkpoints" / "last.pt")["step"] == stopped_at + 2
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_evaluate_prints_json_line(tmp_path, cache_dir, cli_overrides):
    trained = run_cli("pixelda.train", *cli_overrides, cwd=tmp_path, cache_dir=cache_dir)
    assert trained.returncode == 0, trained.stderr
    checkpoint = tmp_path / "run" / "checkpoints" / "best.pt"

    result = run_cli("pixelda.evaluate", f"checkpoint={checkpoint}", cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    scored = json.loads(lines[0])
    assert scored["count"] == 64  # the tiny target test split
    assert 0.0 <= scored["accuracy"] <= 100.0
    assert scored["checkpoint"] == str(checkpoint.resolve())

    folder = tmp_path / "mnistm"
    write_mnistm_folder(folder, count=12)
    result = run_cli("pixelda.evaluate", f"checkpoint={checkpoint}", f"folder={folder}", cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["count"] == 12


def test_evaluate_bad_checkpoint(tmp_path, cache_dir):
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    assert_user_error(run_cli("pixelda.evaluate", f"checkpoint={bogus}", cwd=tmp_path, cache_dir=cache_dir), str(bogus))
    assert_user_error(run_cli("pixelda.evaluate", cwd=tmp_path, cache_dir=cache_dir), "checkpoint=")


def test_evaluate_shared_small_protocol(tmp_path, cache_dir, cli_overrides, shared_data):
    overrides = [o for o in cli_overrides if not o.startswith("data.")] + ["data=mnist_mnistm_small", f"data.root={shared_data}"]
    trained = run_cli("pixelda.train", *overrides, cwd=tmp_path, cache_dir=cache_dir)
    assert trained.returncode == 0, trained.stderr
    checkpoint = tmp_path / "run" / "checkpoints" / "best.pt"

    empty = run_cli("pixelda.evaluate", f"checkpoint={checkpoint}", "split=target_test", cwd=tmp_path, cache_dir=cache_dir)
    assert_user_error(empty, "target_test", "split=auto")
    misspelled = run_cli("pixelda.evaluate", f"checkpoint={checkpoint}", "split=target_tst", cwd=tmp_path, cache_dir=cache_dir)
    assert_user_error(misspelled, "target_tst", "auto")
    moved = run_cli("pixelda.evaluate", f"checkpoint={checkpoint}", f"data_root={tmp_path / 'nodata'}", cwd=tmp_path, cache_dir=cache_dir)
    assert_user_error(moved, "nodata", "set data_root")
    val = run_cli("pixelda.evaluate", f"checkpoint={checkpoint}", "split=target_val", cwd=tmp_path, cache_dir=cache_dir)
    assert json.loads(val.stdout)["count"] == 1000
    # evaluate uses the run's precision by default, so at the run's eval batch size it reproduces the
    # accuracy that selected best.pt (bf16 kernels may round differently at other batch sizes)
    same_batch = run_cli("pixelda.evaluate", f"checkpoint={checkpoint}", "split=target_val", "batch_size=64",
                         cwd=tmp_path, cache_dir=cache_dir)
    logged_best = torch.load(checkpoint, weights_only=True)["best"]["value"]
    assert json.loads(same_batch.stdout)["accuracy"] == pytest.approx(logged_best, abs=1e-3)
    auto = json.loads(run_cli("pixelda.evaluate", f"checkpoint={checkpoint}", cwd=tmp_path, cache_dir=cache_dir).stdout)
    assert auto["split"] == "target_val"  # split=auto is the default
    assert auto["accuracy"] == json.loads(val.stdout)["accuracy"]
    folder = run_cli("pixelda.evaluate", f"checkpoint={checkpoint}", f"folder={shared_data / 'mnist_m'}", cwd=tmp_path, cache_dir=cache_dir)
    assert json.loads(folder.stdout)["count"] == 7000


def test_same_seed_gives_identical_weights(tmp_path, cache_dir, cli_overrides):
    # resnet3's D has 64 filters, so pixelda's random-number threads draw its noise and dropout
    # masks at batch 8. Two processes must still agree bit for bit.
    runs = []
    for name in ("first", "second"):
        result = run_cli("pixelda.train", *cli_overrides, "model=resnet3", "train.max_steps=3", "seed=5",
                         f"hydra.run.dir={tmp_path}/{name}", cwd=tmp_path, cache_dir=cache_dir)
        assert result.returncode == 0, result.stderr
        runs.append(load_checkpoint(tmp_path / name / "checkpoints" / "last.pt"))
    first, second = runs
    for net in ("G", "D", "T"):
        for key, value in first["nets"][net].items():
            assert torch.equal(value, second["nets"][net][key]), f"{net}.{key} differs between two runs with seed=5"
    accuracies = [[{k: v for k, v in entry.items() if k != "train/images_per_sec"} for entry in run["history"]] for run in runs]
    assert accuracies[0] == accuracies[1]
