"""Training runs on tiny settings, logged to a real MLflow store in a temporary folder."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import compose_config, small_protocol_overrides
from pixelda.checkpoint import load_checkpoint
from pixelda.errors import TrainingDiverged, UserError
from pixelda.data import BatchStream
from pixelda.train import train


def only_run(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("pixelda")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_two_step_run_logs_to_mlflow(tiny_cfg, tmp_path):
    best = train(tiny_cfg, overrides=["model=tiny"])
    assert 0.0 <= best <= 100.0

    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "model=tiny"
    assert run.data.params["loss.alpha"] == "0.13"
    assert run.data.params["model.generator.blocks"] == "1"
    assert run.data.tags["pixelda.overrides"] == "model=tiny"
    for name in ("train/loss_d", "train/loss_t", "train/loss_g", "train/d_real", "train/d_fake",
                 "val/target_acc", "test/source_acc", "test/target_acc", "test/domain_gap"):
        assert name in run.data.metrics, name
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_d")] == [1, 2]
    assert run.data.metrics["val/target_acc"] == best

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert artifacts == {"checkpoints/best.pt", "checkpoints/last.pt"}
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert images == ["images/translation_step0000002.png"]


def test_checkpoint_contents(tiny_cfg, tmp_path):
    train(tiny_cfg)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 2
    assert set(state["nets"]) == {"G", "D", "T"}
    assert set(state["optimizers"]) == {"G", "D", "T"}
    assert state["config"]["loss"]["alpha"] == 0.13
    assert [entry["step"] for entry in state["history"]] == [2]
    assert "torch" in state["rng"]
    assert state["mlflow_run_id"]
    assert not list((tmp_path / "checkpoints").glob("*.tmp")), "a temporary file was left behind"


def test_resume_continues_step_count(tiny_overrides, tmp_path):
    train(compose_config(tiny_overrides))
    first = load_checkpoint(tmp_path / "checkpoints" / "last.pt")

    resumed = compose_config(tiny_overrides + ["train.max_steps=5", f"train.resume={tmp_path}/checkpoints/last.pt",
                                               f"train.checkpoint_dir={tmp_path}/resumed"])
    train(resumed)
    state = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert state["step"] == 5
    assert [entry["step"] for entry in state["history"]] == [2, 5]
    assert state["mlflow_run_id"] == first["mlflow_run_id"]

    client, run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_t")]
    assert steps == [1, 2, 3, 4, 5]


def test_logs_at_multiples_of_log_every(tiny_overrides, tmp_path):
    # 64 images at batch 8 make 8 steps per epoch. Logs fall on multiples of 3 and on each epoch's end.
    overrides = tiny_overrides + ["train.log_every=3"]
    train(compose_config(overrides + ["train.max_steps=4"]))
    train(compose_config(overrides + ["train.max_steps=7", f"train.resume={tmp_path}/checkpoints/last.pt",
                                      f"train.checkpoint_dir={tmp_path}/resumed"]))
    train(compose_config(overrides + ["train.max_steps=null", "train.epochs=2", f"train.checkpoint_dir={tmp_path}/two_epochs",
                                      f"tracking.uri=sqlite:///{tmp_path}/other.db"]))

    client, run = only_run(tmp_path)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_t")]
    assert steps == [3, 4, 6, 7]  # stopped at 4 by max_steps, then resumed up to 7
    two_epoch_store = MlflowClient(f"sqlite:///{tmp_path}/other.db")
    (two_epochs,) = two_epoch_store.search_runs([two_epoch_store.get_experiment_by_name("pixelda").experiment_id])
    steps = [m.step for m in two_epoch_store.get_metric_history(two_epochs.info.run_id, "train/loss_t")]
    assert steps == [3, 6, 8, 9, 12, 15, 16]


def test_resume_matches_uninterrupted_run(tiny_overrides, tmp_path):
    straight = compose_config(tiny_overrides + ["train.max_steps=4", f"train.checkpoint_dir={tmp_path}/straight"])
    train(straight)
    train(compose_config(tiny_overrides + [f"train.checkpoint_dir={tmp_path}/part1"]))
    train(compose_config(tiny_overrides + ["train.max_steps=4", f"train.resume={tmp_path}/part1/last.pt",
                                           f"train.checkpoint_dir={tmp_path}/part2"]))
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "part2" / "last.pt")
    for net in ("G", "D", "T"):
        for key in a["nets"][net]:
            assert torch.equal(a["nets"][net][key], b["nets"][net][key]), f"{net}.{key} differs after resuming"
    # the epoch is still running at step 4, so its loss means cover steps 1 to 4 in both runs
    assert a["epoch_stats"]["steps"] == 4
    assert b["epoch_stats"]["steps"] == 4
    assert b["epoch_stats"]["sums"] == pytest.approx(a["epoch_stats"]["sums"], rel=1e-6)


def test_resume_rejects_other_model_size(tiny_overrides, tmp_path):
    train(compose_config(tiny_overrides))
    other = compose_config(tiny_overrides + ["model.generator.blocks=2", f"train.resume={tmp_path}/checkpoints/last.pt"])
    with pytest.raises(UserError, match="trained with model=tiny .G: 1 blocks"):
        train(other)


@pytest.mark.parametrize("mode", ["source_only", "target_only"])
def test_baseline_modes_train_T_alone(tiny_overrides, tmp_path, mode):
    best = train(compose_config(tiny_overrides + [f"mode={mode}"]))
    assert 0.0 <= best <= 100.0
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert set(state["nets"]) == {"T"}
    _, run = only_run(tmp_path)
    assert "train/loss_t" in run.data.metrics
    assert "train/loss_d" not in run.data.metrics
    assert (run.data.tags.get("pixelda.uses_target_labels") == "true") == (mode == "target_only")


def test_generated_small_protocol(small_protocol_root, tiny_overrides, tmp_path):
    cfg = compose_config(tiny_overrides + small_protocol_overrides(small_protocol_root))
    assert 0.0 <= train(cfg) <= 100.0


def test_empty_target_test_is_skipped(small_protocol_root, tiny_overrides, tmp_path):
    overrides = small_protocol_overrides(small_protocol_root) + ["data.target_test.start=40"]
    train(compose_config(tiny_overrides + overrides))
    _, run = only_run(tmp_path)
    assert "val/target_acc" in run.data.metrics
    assert "test/target_acc" not in run.data.metrics


def test_divergence_fails_the_run(tiny_overrides, tmp_path):
    cfg = compose_config(tiny_overrides + ["optimizer.lr=1e30", "train.max_steps=6"])
    with pytest.raises(TrainingDiverged, match="non-finite"):
        train(cfg)
    _, run = only_run(tmp_path)
    assert run.info.status == "FAILED"


def test_negative_loss_weight_rejected(tiny_overrides):
    with pytest.raises(UserError, match=r"loss.beta=-0.5 is invalid"):
        train(compose_config(tiny_overrides + ["loss.beta=-0.5"]))


def test_batch_stream_covers_each_image_once_per_pass():
    stream = BatchStream(size=10, batch_size=4, seed=3)
    drawn = torch.cat([stream.indices(step) for step in range(5)])  # 20 positions = 2 passes
    assert sorted(drawn[:10].tolist()) == list(range(10))
    assert sorted(drawn[10:].tolist()) == list(range(10))
    assert torch.equal(BatchStream(10, 4, seed=3).indices(3), stream.indices(3))


def test_source_and_target_batches_independent():
    source = BatchStream(size=100, batch_size=8, seed=0)
    target = BatchStream(size=100, batch_size=8, seed=0 + 7919)
    assert not torch.equal(source.indices(0), target.indices(0))
