"""The named recipes of conf/experiment compose with the real config and set the values docs/results.md documents."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from omegaconf import OmegaConf

from conftest import CONF_DIR, REPO, compose_config

RECIPES = sorted(path.stem for path in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_composes(name):
    cfg = compose_config([f"experiment={name}"])
    assert cfg.tracking.experiment == name
    assert cfg.train.max_minutes is not None


def test_cpu_hour_values():
    cfg = compose_config(["experiment=cpu_hour"])
    assert cfg.data.name == "mnist_mnistm_small"
    assert cfg.model.generator.filters == 32
    assert cfg.model.discriminator.filters == 32
    assert cfg.train.max_minutes == 55
    assert cfg.loss.self_training_weight == 0


def test_selftrain_differs_only_in_selftraining():
    base = OmegaConf.to_container(compose_config(["experiment=cpu_hour"]), resolve=False)
    extended = OmegaConf.to_container(compose_config(["experiment=cpu_hour_selftrain"]), resolve=False)
    assert extended["loss"]["self_training_weight"] > 0
    for config in (base, extended):
        config["tracking"].pop("experiment")
        for key in ("self_training_weight", "self_training_threshold", "self_training_start"):
            config["loss"].pop(key)
    assert extended == base


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_reproduce_default_recipe():
    # Under `make test`, this make is a sub-make, which prints "Entering directory" lines by default.
    printed = subprocess.run(["make", "--no-print-directory", "-n", "reproduce", "SEED=3"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
    train = next(line for line in printed.splitlines() if "-m pixelda.train" in line)
    assert "experiment=cpu_hour_selftrain" in train
    assert "seed=3" in train
    assert printed.rstrip().splitlines()[-1].endswith(
        "-m pixelda.evaluate checkpoint=outputs/reproduce/cpu_hour_selftrain/seed3/checkpoints/best.pt split=auto")
