"""Each training option on tiny settings: shapes, a finite loss, and a change in the update it affects."""

from __future__ import annotations

import pytest
import torch

from conftest import compose_config
from pixelda.data import Split, Splits, random_shift
from pixelda.steps import discriminator_loss, generator_adversarial_loss, pairwise_mse
from pixelda.train import StepInputs, build_training, train

# Stochastic layers off, so that a difference between two updates comes from the option alone.
DETERMINISTIC = ["model=tiny", "model.discriminator.noise_std=0", "model.discriminator.dropout=0",
                 "model.classifier.dropout=0", "train.batch_size=8"]


def run_one_step(overrides: list[str], steps: int = 1):
    """Build the tiny training from seed 0 and run `steps` steps on fixed random batches.

    Returns the parts and each network's parameter change.
    """
    cfg = compose_config(DETERMINISTIC + overrides)
    torch.manual_seed(0)
    parts = build_training(cfg, torch.device("cpu"), None, total_steps=10)
    before = {name: [p.detach().clone() for p in net.parameters()] for name, net in parts.nets.items()}
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        xs = torch.rand(8, 3, 32, 32, generator=generator) * 2 - 1
        ys = torch.randint(0, 10, (8,), generator=generator)
        xt = torch.rand(8, 3, 32, 32, generator=generator) * 2 - 1
        z = torch.rand(8, cfg.model.generator.noise_dim, generator=generator) * 2 - 1
        torch.manual_seed(2 + step)
        parts.update.step_index = step
        stats = parts.update(xs, ys, xt, z)
        assert stats.shape == (5,)
        assert torch.isfinite(stats).all(), stats
        for scheduler in parts.schedulers.values():
            scheduler.step()
    deltas = {name: torch.cat([(p.detach() - b).flatten() for p, b in zip(net.parameters(), before[name])])
              for name, net in parts.nets.items()}
    return parts, deltas


@pytest.fixture(scope="module")
def reference_deltas():
    # two steps, because Adam's first step does not depend on its betas
    return run_one_step([], steps=2)[1]


# option -> the networks whose update it must change
OPTIONS = {
    "loss.gan=lsgan": ("D", "G"),
    "loss.gan=hinge": ("D", "G"),
    "loss.content_weight=1.0": ("G",),
    "loss.label_smoothing=0.3": ("D",),
    "loss.instance_noise=0.5": ("D", "G"),
    "loss.self_training_weight=1.0": ("T",),
    "train.d_updates=2": ("D",),
    "train.g_updates=2": ("G",),
    "train.t_updates=2": ("T",),
    "train.grad_clip=0.0001": ("D", "T", "G"),
    "net_optimizer.D.lr=0.01": ("D",),
    "net_optimizer.G.betas=[0.9,0.99]": ("G",),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_option_changes_update(option, reference_deltas):
    extra = ["loss.self_training_threshold=0.0"] if option.startswith("loss.self_training") else []
    _, deltas = run_one_step([option] + extra, steps=2)
    for name in OPTIONS[option]:
        assert not torch.allclose(deltas[name], reference_deltas[name]), f"{option} left {name}'s update unchanged"


def test_d_option_leaves_t_update_alone():
    # in the first step T's update happens before D's change can reach G
    _, deltas = run_one_step(["loss.label_smoothing=0.3"], steps=1)
    first_step_reference = run_one_step([], steps=1)[1]
    assert torch.allclose(deltas["T"], first_step_reference["T"])


@pytest.mark.parametrize("schedule", ["step", "cosine"])
def test_lr_schedule_lowers_lr(schedule):
    parts, _ = run_one_step([f"train.lr_schedule={schedule}", "train.lr_decay_steps=1", "train.lr_decay_factor=0.5"], steps=2)
    lr = parts.optimizers["G"].param_groups[0]["lr"]
    assert lr < 1e-3
    if schedule == "step":
        assert lr == pytest.approx(1e-3 * 0.25)


def test_constant_schedule_keeps_lr():
    parts, _ = run_one_step([], steps=2)
    assert parts.optimizers["T"].param_groups[0]["lr"] == 1e-3


def test_ema_is_evaluated():
    parts, _ = run_one_step(["train.ema_decay=0.5"], steps=2)
    averaged = parts.eval_net("T")
    assert averaged is not parts.nets["T"]
    live = torch.cat([p.flatten() for p in parts.nets["T"].parameters()])
    ema = torch.cat([p.flatten() for p in averaged.parameters()])
    assert not torch.allclose(live, ema)
    assert not averaged.training


@pytest.mark.parametrize("option", ["model.discriminator.batchnorm=true", "model.classifier.batchnorm=true",
                                    "model.classifier.private_first_layer=true", "model.generator.noise_dim=10"])
def test_architecture_options_train(option, reference_deltas):
    parts, deltas = run_one_step([option], steps=2)
    sizes = {name: delta.numel() for name, delta in deltas.items()}
    assert sizes != {name: delta.numel() for name, delta in reference_deltas.items()}, f"{option} built the same networks"


def test_private_first_layer_routes_source_images():
    parts, _ = run_one_step(["model.classifier.private_first_layer=true"])
    T = parts.nets["T"]
    x = torch.rand(4, 3, 32, 32)
    T.eval()
    assert T(x).shape == (4, 10)
    assert not torch.allclose(T(x, source=True), T(x))
    assert T.first_source.weight.grad is not None  # the source layer trained
    assert not parts.update.joint_t_pass


def test_pairwise_mse_ignores_global_shift():
    a = torch.rand(4, 3, 32, 32)
    assert pairwise_mse(a + 0.3, a).item() == pytest.approx(0.0, abs=1e-6)
    b = torch.rand(4, 3, 32, 32)
    assert pairwise_mse(a, b).item() > 0
    assert pairwise_mse(a, b).item() <= torch.mean((a - b) ** 2).item() + 1e-6


@pytest.mark.parametrize("kind", ["bce", "lsgan", "hinge"])
def test_gan_losses_prefer_correct_scores(kind):
    good = discriminator_loss(kind, torch.full((4,), 3.0), torch.full((4,), -3.0))
    bad = discriminator_loss(kind, torch.full((4,), -3.0), torch.full((4,), 3.0))
    assert good < bad
    assert generator_adversarial_loss(kind, torch.full((4,), 3.0)) < generator_adversarial_loss(kind, torch.full((4,), -3.0))


def test_random_shift_moves_content():
    torch.manual_seed(0)
    x = torch.zeros(16, 3, 32, 32) - 1
    x[:, :, 10:20, 10:20] = 1
    shifted = random_shift(x, 3)
    assert shifted.shape == x.shape
    assert (shifted == 1).sum() == (x == 1).sum()  # a shift of 3 keeps the 10 x 10 square inside
    assert not torch.equal(shifted, x)


def test_step_inputs_shift_source_batches():
    images = torch.zeros(16, 1, 32, 32, dtype=torch.uint8)
    images[:, :, 12:20, 12:20] = 255
    split = Split(images, torch.zeros(16, dtype=torch.long))
    target = Split(torch.zeros(16, 3, 32, 32, dtype=torch.uint8), None)
    splits = Splits(source_train=split, source_test=split, target_train=target, target_val=split, target_test=split)
    plain = StepInputs(splits, "pixelda", 8, 0, 4, torch.device("cpu"))(0)[0]
    torch.manual_seed(0)
    shifted = StepInputs(splits, "pixelda", 8, 0, 4, torch.device("cpu"), augment_shift=2)(0)[0]
    assert shifted.shape == plain.shape == (8, 3, 32, 32)
    assert not torch.equal(shifted, plain)
    assert (shifted == 1).sum() == (plain == 1).sum()


def test_all_options_in_one_run(tiny_overrides, tmp_path):
    options = ["loss.gan=lsgan", "loss.content_weight=0.1", "loss.label_smoothing=0.1", "loss.instance_noise=0.1",
               "loss.self_training_weight=0.5", "train.t_updates=2", "train.grad_clip=5", "train.lr_schedule=cosine",
               "train.ema_decay=0.9", "train.augment_shift=2", "model.discriminator.batchnorm=true",
               "model.classifier.batchnorm=true", "model.classifier.private_first_layer=true", "train.max_steps=4"]
    best = train(compose_config(tiny_overrides + options))
    assert 0.0 <= best <= 100.0
    resumed = compose_config(tiny_overrides + options[:-1] + ["train.max_steps=6", f"train.resume={tmp_path}/checkpoints/last.pt",
                                                              f"train.checkpoint_dir={tmp_path}/resumed"])
    train(resumed)
