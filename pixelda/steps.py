"""One optimizer step of each training mode, shared by the training loop and the benchmarks.

Each step returns a float tensor of STAT_NAMES on the device, so the loop can average them without
a device sync per step. With every option at its default, PixelDAStep is the reference update:
BCE GAN losses on logits, one D, one T and one G update per step.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelda.runtime import autocast

STAT_NAMES = ("loss_d", "loss_t", "loss_g", "d_real", "d_fake")
GAN_LOSSES = ("bce", "lsgan", "hinge")


@contextlib.contextmanager
def frozen(*nets: nn.Module) -> Iterator[None]:
    """Skip weight gradients of nets; gradients still flow through them to their inputs."""
    params = [p for net in nets for p in net.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def discriminator_loss(kind: str, real: torch.Tensor, fake: torch.Tensor, real_target: float = 1.0) -> torch.Tensor:
    """D's loss on its outputs for real target images and translated images."""
    if kind == "bce":
        return (F.binary_cross_entropy_with_logits(real, torch.full_like(real, real_target))
                + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
    if kind == "lsgan":
        return F.mse_loss(real, torch.full_like(real, real_target)) + F.mse_loss(fake, torch.zeros_like(fake))
    if kind == "hinge":
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    raise ValueError(f"unknown GAN loss {kind!r}")


def generator_adversarial_loss(kind: str, fake: torch.Tensor) -> torch.Tensor:
    """G's adversarial loss on D's outputs for translated images (non-saturating for bce)."""
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
    if kind == "lsgan":
        return F.mse_loss(fake, torch.ones_like(fake))
    if kind == "hinge":
        return -fake.mean()
    raise ValueError(f"unknown GAN loss {kind!r}")


def pairwise_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise mean squared error (Eigen et al. 2014): the MSE minus the squared mean difference.

    It penalises differences between pixel pairs, so a global shift of colour or brightness costs
    nothing. Returns the mean over the batch.
    """
    d = (a.float() - b.float()).flatten(1)  # B x (3 * 32 * 32)
    k = d.shape[1]
    return (d.pow(2).sum(1) / k - d.sum(1).pow(2) / k**2).mean()


class WeightAverage:
    """An exponential moving average of a module's parameters; buffers are copied."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(module).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        averaged = list(self.module.parameters())
        current = [p.detach() for p in module.parameters()]
        torch._foreach_lerp_(averaged, current, 1.0 - self.decay)
        for mine, theirs in zip(self.module.buffers(), module.buffers()):
            mine.copy_(theirs)


class PixelDAStep:
    """The alternating D, T and G updates on one source batch and one target batch.

    G, D and T may be torch.compile wrappers. `modules` maps names to the plain modules, whose
    parameters are frozen during G's update and clipped. The loop sets `progress` (0 to 1, anneals instance
    noise) and `step_index` (starts self-training) before each call.
    """

    def __init__(self, G: nn.Module, D: nn.Module, T: nn.Module, modules: dict[str, nn.Module],
                 optimizers: dict[str, torch.optim.Optimizer], alpha: float, beta: float, g_loss_weight: float,
                 device: torch.device, amp_dtype: Optional[torch.dtype] = None, gan: str = "bce",
                 content_weight: float = 0.0, label_smoothing: float = 0.0, instance_noise: float = 0.0,
                 self_training_weight: float = 0.0, self_training_threshold: float = 0.9, self_training_start: int = 0,
                 d_updates: int = 1, g_updates: int = 1, t_updates: int = 1, grad_clip: Optional[float] = None,
                 averages: Optional[dict[str, WeightAverage]] = None):
        if gan not in GAN_LOSSES:
            raise ValueError(f"unknown GAN loss {gan!r}")
        self.G, self.D, self.T = G, D, T
        self.modules, self.optimizers = modules, optimizers
        self.alpha, self.beta, self.g_loss_weight = alpha, beta, g_loss_weight
        self.device, self.amp_dtype = device, amp_dtype
        self.gan, self.content_weight = gan, content_weight
        self.real_target = 1.0 - label_smoothing
        self.instance_noise = instance_noise
        self.self_training_weight, self.self_training_threshold = self_training_weight, self_training_threshold
        self.self_training_start = self_training_start
        self.d_updates, self.g_updates, self.t_updates = d_updates, g_updates, t_updates
        self.grad_clip = grad_clip
        self.averages = averages or {}
        # One pass over both batches equals two passes when the network has no BatchNorm, whose batch
        # statistics would mix the two domains (and, for T, no private first layer).
        self.joint_t_pass = modules["T"].shares_all_layers
        self.joint_d_pass = not any(isinstance(m, nn.BatchNorm2d) for m in modules["D"].modules())
        self.progress = 0.0
        self.step_index = 0

    def _apply(self, name: str, loss: torch.Tensor) -> None:
        optimizer = self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.modules[name].parameters(), self.grad_clip)
        optimizer.step()
        if name in self.averages:
            self.averages[name].update(self.modules[name])

    def _noisy(self, x: torch.Tensor) -> torch.Tensor:
        """Add annealed instance noise to one of D's inputs."""
        std = self.instance_noise * max(0.0, 1.0 - self.progress)
        return x + torch.randn_like(x) * std if std > 0 else x

    def _classify(self, xs: torch.Tensor, others: list[torch.Tensor]) -> list[torch.Tensor]:
        """T's logits for the source batch and each other (translated or target) batch."""
        if self.joint_t_pass:
            logits = self.T(torch.cat([xs, *others]))  # (1 + len(others)) B x 10
            return list(logits.split(xs.shape[0]))
        return [self.T(xs, source=True)] + [self.T(x) for x in others]

    def _pseudo_labels(self, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted labels of target images and whether each is confident enough to train on."""
        labeler = self.averages["T"].module if "T" in self.averages else self.modules["T"]
        was_training = labeler.training
        labeler.eval()
        with torch.no_grad(), autocast(self.device, self.amp_dtype):
            probabilities = F.softmax(labeler(xt).float(), dim=1)
        labeler.train(was_training)
        confidence, labels = probabilities.max(dim=1)
        return labels, (confidence >= self.self_training_threshold).float()

    def __call__(self, xs: torch.Tensor, ys: torch.Tensor, xt: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        G, D = self.G, self.D
        ce = F.cross_entropy
        with autocast(self.device, self.amp_dtype):
            fake = G(xs, z)  # B x 3 x 32 x 32

        # D step: tell real target images from translated ones
        for _ in range(self.d_updates):
            with autocast(self.device, self.amp_dtype):
                if self.joint_d_pass:
                    d_real, d_fake = D(self._noisy(torch.cat([xt, fake.detach()]))).split(xt.shape[0])  # B, B
                else:
                    d_real, d_fake = D(self._noisy(xt)), D(self._noisy(fake.detach()))
                loss_d = self.alpha * discriminator_loss(self.gan, d_real, d_fake, self.real_target)
            self._apply("D", loss_d)

        # T step: classify source and translated images with the source label
        self_training = self.self_training_weight > 0 and self.step_index >= self.self_training_start
        if self_training:
            pseudo, confident = self._pseudo_labels(xt)
        for _ in range(self.t_updates):
            with autocast(self.device, self.amp_dtype):
                logits = self._classify(xs, [fake.detach(), xt] if self_training else [fake.detach()])
                loss_t = ce(logits[0], ys) + ce(logits[1], ys)
                if self_training:
                    loss_t = loss_t + self.self_training_weight * (ce(logits[2], pseudo, reduction="none") * confident).mean()
            self._apply("T", loss_t)

        # G step: fool the updated D and keep the digit readable for the updated T
        for update in range(self.g_updates):
            if update > 0:  # G changed, so translate again with fresh noise
                with autocast(self.device, self.amp_dtype):
                    fake = G(xs, torch.rand_like(z) * 2 - 1)
            with frozen(self.modules["D"], self.modules["T"]), autocast(self.device, self.amp_dtype):
                loss_g = (self.g_loss_weight * generator_adversarial_loss(self.gan, D(self._noisy(fake)))
                          + self.beta * ce(self.T(fake), ys))
                if self.content_weight > 0:
                    loss_g = loss_g + self.content_weight * pairwise_mse(fake, xs)
            self._apply("G", loss_g)

        real_score, fake_score = (torch.sigmoid(d_real), torch.sigmoid(d_fake)) if self.gan == "bce" else (d_real, d_fake)
        return torch.stack([loss_d.detach(), loss_t.detach(), loss_g.detach(),
                            real_score.detach().float().mean(), fake_score.detach().float().mean()]).float()


class ClassifierStep:
    """A supervised T update, for mode=source_only (source images) and mode=target_only (target images)."""

    def __init__(self, T: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 amp_dtype: Optional[torch.dtype] = None, grad_clip: Optional[float] = None,
                 average: Optional[WeightAverage] = None, module: Optional[nn.Module] = None):
        self.T, self.optimizer = T, optimizer
        self.module = module if module is not None else T
        self.device, self.amp_dtype = device, amp_dtype
        self.grad_clip, self.average = grad_clip, average
        self.progress = 0.0
        self.step_index = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.amp_dtype):
            loss_t = F.cross_entropy(self.T(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss_t.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        if self.average is not None:
            self.average.update(self.module)
        zero = torch.zeros((), device=loss_t.device)
        return torch.stack([zero, loss_t.detach().float(), zero, zero, zero])


def lr_multiplier(schedule: str, total_steps: int, decay_factor: float, decay_steps: int):
    """Return step -> learning-rate multiplier for the lr_schedule config value."""
    if schedule == "constant":
        return lambda step: 1.0
    if schedule == "step":
        return lambda step: decay_factor ** (step // decay_steps)
    if schedule == "cosine":
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    raise ValueError(f"unknown lr schedule {schedule!r}")
