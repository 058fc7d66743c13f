"""Composition of the real Hydra config: every group option, the reference defaults, schema checks."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf.errors import ValidationError

from conftest import CONF_DIR, compose_config
from pixelda.model import build_networks
from pixelda.train import optimizer_factory

GROUPS = ["model", "loss", "optimizer", "data"]


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes(group):
    options = group_options(group)
    assert options, f"conf/{group}/ has no options"
    for option in options:
        cfg = compose_config([f"{group}={option}"])
        assert cfg.model.generator.blocks >= 1
        assert cfg.loss.alpha >= 0
        assert cfg.data.target_val is not None
        if group == "model":
            assert cfg.model.name == option
            nets = build_networks(cfg.model)
            assert set(nets) == {"G", "D", "T"}
        if group == "data":
            assert cfg.data.name == option
        if group == "optimizer":
            optimizer = optimizer_factory(cfg.optimizer)([torch.nn.Parameter(torch.zeros(1))])
            assert isinstance(optimizer, torch.optim.Optimizer)


def test_defaults_match_reference():
    cfg = compose_config([])
    assert cfg.model.name == "resnet6"
    assert (cfg.model.generator.blocks, cfg.model.generator.filters, cfg.model.generator.noise_dim) == (6, 64, 100)
    assert (cfg.loss.alpha, cfg.loss.beta, cfg.loss.g_loss_weight) == (0.13, 0.01, 0.011)
    assert cfg.optimizer._target_ == "torch.optim.Adam"
    assert cfg.optimizer.lr == 1e-3
    assert list(cfg.optimizer.betas) == [0.5, 0.999]
    assert cfg.optimizer.weight_decay == 1e-5
    assert cfg.data.name == "embedded"
    assert cfg.train.batch_size == 32
    assert cfg.mode == "pixelda"


def test_documented_command_composes():
    cfg = compose_config(["model=resnet6", "loss.alpha=0.13"])
    assert cfg.model.name == "resnet6"
    assert cfg.loss.alpha == 0.13


@pytest.mark.parametrize("data", ["mnist_mnistm", "mnist_mnistm_small", "embedded"])
def test_validation_split_has_1000_images(data):
    cfg = compose_config([f"data={data}"])
    assert cfg.data.target_val.stop - cfg.data.target_val.start == 1000


def test_small_protocol_indices():
    data = compose_config(["data=mnist_mnistm_small"]).data
    assert (data.source_train.start, data.source_train.stop) == (0, 6000)
    assert (data.target_train.start, data.target_train.stop) == (0, 6000)
    assert (data.target_val.start, data.target_val.stop) == (6000, 7000)
    assert (data.source_test.start, data.source_test.stop) == (9001, 10000)
    assert (data.target_test.start, data.target_test.stop) == (7000, None)


def test_misspelt_key_rejected():
    with pytest.raises(ConfigCompositionException, match="alpah"):
        compose_config(["loss.alpah=0.1"])


def test_wrong_type_rejected():
    with pytest.raises((ConfigCompositionException, ValidationError), match="epochs"):
        compose_config(["train.epochs=many"])


def test_unknown_model_rejected():
    with pytest.raises(HydraException, match="resnet99"):
        compose_config(["model=resnet99"])
