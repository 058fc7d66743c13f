"""Train PixelDA (or a source-only / target-only baseline) and log the run to MLflow.

    python -m pixelda.train model=resnet6 loss.alpha=0.13
    python -m pixelda.train data=mnist_mnistm_small data.root=../shared/data train.epochs=10

Each step draws a source batch (x_s, y_s) and, independently, a target batch x_t, then updates D,
T and G in that order. After every epoch T is evaluated in eval mode on source test, target
validation and target test. best.pt keeps the state with the best target validation, and last.pt
the latest one. The task function returns the best target-validation accuracy, the value that
sweeps maximize.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Optional

import hydra
import torch
import torch.nn as nn
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from pixelda.checkpoint import CHECKPOINT_FORMAT, check_same_model, load_checkpoint, save_checkpoint
from pixelda.config import register_configs
from pixelda.data import SPLIT_NAMES, BatchStream, Splits, build_splits, random_shift, to_model_input
from pixelda.errors import TrainingDiverged, UserError, report_user_errors
from pixelda.diagnostics import final_figures
from pixelda.figures import save_curves, save_data_preview, save_translation_grid
from pixelda.model import build_networks
from pixelda.runtime import StopRequest, accuracy, autocast, pick_device, resolve_precision
from pixelda.steps import GAN_LOSSES, STAT_NAMES, ClassifierStep, PixelDAStep, WeightAverage, lr_multiplier
from pixelda.tracking import RunLogger, run_name_from_overrides

log = logging.getLogger("pixelda.train")

MODES = ("pixelda", "source_only", "target_only")
# Optimizer classes that the optimizer config may name as its _target_.
OPTIMIZER_TARGETS = ("torch.optim.*", "pixelda.*")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def validate_config(cfg: DictConfig) -> None:
    """Reject values that would fail late or silently train something else."""
    if cfg.mode not in MODES:
        raise UserError(f"unknown mode '{cfg.mode}'; use one of {', '.join(MODES)}")

    for key in ("alpha", "beta", "g_loss_weight"):
        value = cfg.loss[key]
        if not math.isfinite(value) or value < 0:
            raise UserError(f"loss.{key}={value} is invalid; loss weights must be finite and >= 0 (reference: alpha=0.13, beta=0.01, g_loss_weight=0.011)")
    positive = {
        "train.epochs": cfg.train.epochs, "train.batch_size": cfg.train.batch_size,
        "train.eval_batch_size": cfg.train.eval_batch_size, "train.log_every": cfg.train.log_every,
        "model.generator.blocks": cfg.model.generator.blocks, "model.generator.filters": cfg.model.generator.filters,
        "model.generator.noise_dim": cfg.model.generator.noise_dim, "model.discriminator.filters": cfg.model.discriminator.filters,
    }
    if cfg.train.max_steps is not None:
        positive["train.max_steps"] = cfg.train.max_steps
    for key, value in positive.items():
        if value < 1:
            raise UserError(f"{key}={value} is invalid; it must be a positive integer")

    train_cfg, loss = cfg.train, cfg.loss
    for key in ("d_updates", "g_updates", "t_updates", "lr_decay_steps"):
        if train_cfg[key] < 1:
            raise UserError(f"train.{key}={train_cfg[key]} is invalid; it must be a positive integer")
    if loss.gan not in GAN_LOSSES:
        raise UserError(f"unknown loss.gan '{loss.gan}'; use one of {', '.join(GAN_LOSSES)}")
    if train_cfg.lr_schedule not in ("constant", "step", "cosine"):
        raise UserError(f"unknown train.lr_schedule '{train_cfg.lr_schedule}'; use constant, step or cosine")
    ranges = {"loss.label_smoothing": (loss.label_smoothing, 0.0, 1.0), "loss.self_training_threshold": (loss.self_training_threshold, 0.0, 1.0),
              "train.lr_decay_factor": (train_cfg.lr_decay_factor, 0.0, 1.0)}
    if train_cfg.ema_decay is not None:
        ranges["train.ema_decay"] = (train_cfg.ema_decay, 0.0, 1.0)
    for key, (value, low, high) in ranges.items():
        if not low <= value <= high:
            raise UserError(f"{key}={value} is invalid; it must lie in [{low}, {high}]")
    for key in ("content_weight", "instance_noise", "self_training_weight"):
        if not math.isfinite(loss[key]) or loss[key] < 0:
            raise UserError(f"loss.{key}={loss[key]} is invalid; it must be finite and >= 0")
    if train_cfg.augment_shift < 0 or (train_cfg.grad_clip is not None and train_cfg.grad_clip <= 0):
        raise UserError(f"train.augment_shift={train_cfg.augment_shift} and train.grad_clip={train_cfg.grad_clip} must be >= 0 and > 0 (or null)")

    if cfg.optimizer is None or "_target_" not in cfg.optimizer:
        raise UserError("optimizer has no _target_; choose a preset such as optimizer=adam")


def optimizer_factory(optimizer_cfg: DictConfig):
    """Instantiate the partial optimizer config; its _target_ must be a torch.optim or pixelda class."""
    return hydra.utils.instantiate(optimizer_cfg, _execution_whitelist_=list(OPTIMIZER_TARGETS))


def capture_rng(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def format_line(epoch: int, epochs: int, step: int, last: dict, mean: dict, metrics: dict, best: float, rate: float) -> str:
    """Format the fixed-width epoch line. Each loss shows the last log interval's value and the epoch's mean."""
    def pct(value: Optional[float]) -> str:
        return "   n/a " if value is None else f"{value:6.2f}%"

    parts = [f"epoch {epoch:>3}/{epochs:<3}", f"step {step:>7}"]
    for name in ("loss_d", "loss_t", "loss_g"):
        if name in last:
            parts.append(f"{name} {last[name]:7.4f} ({mean[name]:7.4f})")
    if "d_real" in last:
        parts.append(f"D(x) {last['d_real']:.3f} D(G(z)) {last['d_fake']:.3f}")
    parts.append(f"source {pct(metrics.get('test/source_acc'))}")
    parts.append(f"val {pct(metrics.get('val/target_acc'))} (best {best:6.2f}%)")
    parts.append(f"test {pct(metrics.get('test/target_acc'))}")
    parts.append(f"{rate:7.1f} img/s")
    return " | ".join(parts)


@dataclass
class TrainingParts:
    """Everything that one training updates and that a checkpoint stores."""

    nets: dict[str, nn.Module]
    """Plain modules; checkpoints store these."""
    run_nets: dict[str, nn.Module]
    """The torch.compile wrappers when train.compile is set, else the plain modules."""
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR]
    averages: dict[str, WeightAverage]
    """Weight averages of G and T (train.ema_decay), empty when off."""
    update: Callable[..., torch.Tensor]
    """One training step: PixelDAStep or ClassifierStep."""

    def eval_net(self, name: str) -> nn.Module:
        """Return the network to evaluate, translate and export: its weight average when there is one."""
        return self.averages[name].module if name in self.averages else self.run_nets[name]

    def state(self) -> dict:
        return {
            "nets": {name: net.state_dict() for name, net in self.nets.items()},
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "schedulers": {name: sched.state_dict() for name, sched in self.schedulers.items()},
            "averages": {name: average.module.state_dict() for name, average in self.averages.items()},
        }

    def load_state(self, state: dict) -> None:
        for name, net in self.nets.items():
            net.load_state_dict(state["nets"][name])
            self.optimizers[name].load_state_dict(state["optimizers"][name])
            self.schedulers[name].load_state_dict(state["schedulers"][name])
        for name, average in self.averages.items():
            average.module.load_state_dict(state["averages"].get(name, state["nets"][name]))


def build_training(cfg: DictConfig, device: torch.device, amp_dtype: Optional[torch.dtype], total_steps: int = 1):
    """Build the networks the mode trains, their optimizers, LR schedulers, weight averages and the step update.

    total_steps sets the end of the cosine schedule.
    """
    all_nets = build_networks(cfg.model)
    names = ("G", "D", "T") if cfg.mode == "pixelda" else ("T",)
    nets = {name: all_nets[name].to(device) for name in names}
    if cfg.train.channels_last:
        # D stays NCHW: its per-pixel noise and dropout are slower on NHWC tensors on the CPU
        nets = {name: net.to(memory_format=torch.channels_last) if name != "D" else net for name, net in nets.items()}
    make_optimizer = optimizer_factory(cfg.optimizer)
    optimizers = {}
    for name, net in nets.items():
        per_net = cfg.net_optimizer[name]
        extra = {"lr": per_net.lr} if per_net.lr is not None else {}
        if per_net.betas is not None:
            extra["betas"] = tuple(per_net.betas)
        optimizers[name] = make_optimizer(net.parameters(), **extra)
    multiplier = lr_multiplier(cfg.train.lr_schedule, total_steps, cfg.train.lr_decay_factor, cfg.train.lr_decay_steps)
    schedulers = {name: torch.optim.lr_scheduler.LambdaLR(opt, multiplier) for name, opt in optimizers.items()}
    averages = {}
    if cfg.train.ema_decay is not None:
        averages = {name: WeightAverage(nets[name], cfg.train.ema_decay) for name in ("G", "T") if name in nets}
    run_nets = {name: torch.compile(net, dynamic=False) for name, net in nets.items()} if cfg.train.compile else nets

    if cfg.mode == "pixelda":
        loss = cfg.loss
        update = PixelDAStep(
            run_nets["G"], run_nets["D"], run_nets["T"], nets, optimizers, alpha=loss.alpha, beta=loss.beta,
            g_loss_weight=loss.g_loss_weight, device=device, amp_dtype=amp_dtype, gan=loss.gan,
            content_weight=loss.content_weight, label_smoothing=loss.label_smoothing, instance_noise=loss.instance_noise,
            self_training_weight=loss.self_training_weight, self_training_threshold=loss.self_training_threshold,
            self_training_start=loss.self_training_start, d_updates=cfg.train.d_updates, g_updates=cfg.train.g_updates,
            t_updates=cfg.train.t_updates, grad_clip=cfg.train.grad_clip, averages=averages,
        )
    else:
        update = ClassifierStep(run_nets["T"], optimizers["T"], device=device, amp_dtype=amp_dtype,
                                grad_clip=cfg.train.grad_clip, average=averages.get("T"), module=nets["T"])
    return TrainingParts(nets, run_nets, optimizers, schedulers, averages, update)


class StepInputs:
    """The inputs of step s: (x_s, y_s, x_t, z) for PixelDA, (x, y) for the baselines.

    Images are gathered from the uint8 splits on the device and scaled to floats in [-1, 1] only
    for the batch. The index streams are fixed by (seed, step), which makes resuming exact.
    """

    def __init__(self, splits: Splits, mode: str, batch_size: int, seed: int, noise_dim: int,
                 device: torch.device, augment_shift: int = 0):
        self.mode = mode
        self.augment_shift = augment_shift
        self.train_split = splits.target_train if mode == "target_only" else splits.source_train
        self.target = splits.target_train
        self.batch_size, self.noise_dim = batch_size, noise_dim
        self.device = device
        self.steps_per_epoch = math.ceil(len(self.train_split) / batch_size)
        self.train_stream = BatchStream(len(self.train_split), batch_size, seed=seed)
        self.target_stream = BatchStream(len(self.target), batch_size, seed=seed + 7919)

    def as_input(self, images: torch.Tensor, shift: int = 0) -> torch.Tensor:
        """uint8 N x C x 32 x 32 -> N x 3 x 32 x 32 floats in [-1, 1], randomly shifted by up to `shift` pixels."""
        x = to_model_input(images)
        return random_shift(x, shift).contiguous() if shift else x.contiguous()

    def __call__(self, step: int) -> tuple[torch.Tensor, ...]:
        idx = self.train_stream.indices(step).to(self.device)
        x = self.as_input(self.train_split.images[idx], self.augment_shift)  # B x 3 x 32 x 32
        y = self.train_split.labels[idx]
        if self.mode != "pixelda":
            return x, y
        xt = self.as_input(self.target.images[self.target_stream.indices(step).to(self.device)])
        z = torch.rand(self.batch_size, self.noise_dim, device=self.device) * 2 - 1  # B x noise_dim, uniform(-1, 1)
        return x, y, xt, z


def load_data(cfg: DictConfig, device: torch.device) -> Splits:
    """Build the five splits and move them, still uint8, to the device once."""
    splits = build_splits(cfg.data, read_target_train_labels=cfg.mode == "target_only")
    for name in SPLIT_NAMES:
        split = getattr(splits, name)
        split.images = split.images.to(device)
        split.labels = None if split.labels is None else split.labels.to(device)
        log.info("%-12s %6d images", name, len(split))
    if len(splits.target_test) == 0:
        log.warning("the target test split is empty, so test/target_acc is skipped; report target validation instead")
    return splits


def checkpoint_state(cfg: DictConfig, parts: TrainingParts, step: int, steps_per_epoch: int,
                     history: list, best: dict, device: torch.device, run_id: str, loss_history: list,
                     epoch_stats: Optional[dict] = None) -> dict:
    """Collect what a resumed run needs. epoch_stats contains the current epoch's loss sums and step count."""
    return {
        "format": CHECKPOINT_FORMAT,
        "config": OmegaConf.to_container(cfg, resolve=True),
        **parts.state(),
        "step": step,
        "epoch": step // steps_per_epoch,
        "history": history,
        "loss_history": loss_history,
        "best": best,
        "rng": capture_rng(device),
        "mlflow_run_id": run_id,
        "epoch_stats": epoch_stats,
    }


def train(cfg: DictConfig, overrides: Optional[list[str]] = None) -> float:
    """Run one training and return the best target-validation accuracy in percent."""
    run_started = time.perf_counter()
    overrides = list(overrides or [])
    validate_config(cfg)
    device = pick_device(cfg.device)
    amp_dtype = resolve_precision(cfg.train.precision, device)
    torch.manual_seed(cfg.seed)
    log.info("device %s, precision %s, mode %s", device, "fp32" if amp_dtype is None else "bf16 autocast", cfg.mode)

    # data: uint8 tensors on the device. PixelDA draws source and target batches independently.
    splits = load_data(cfg, device)
    batches = StepInputs(splits, cfg.mode, cfg.train.batch_size, cfg.seed, cfg.model.generator.noise_dim, device,
                         cfg.train.augment_shift)
    batch_size = cfg.train.batch_size
    steps_per_epoch = batches.steps_per_epoch
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    if cfg.train.lr_schedule == "cosine" and cfg.train.max_minutes is not None and cfg.train.max_steps is None:
        # The cosine horizon is a step count, and a wall-time budget usually stops the run long before it.
        log.warning("train.lr_schedule=cosine decays to 0 at step %d (train.epochs x %d steps), but train.max_minutes=%s "
                    "may stop the run long before; set train.max_steps to the steps that fit in the budget",
                    total_steps, steps_per_epoch, cfg.train.max_minutes)
    as_input = batches.as_input

    # networks, optimizers and the update of one step (source_only and target_only train T alone)
    parts = build_training(cfg, device, amp_dtype, total_steps)
    update = parts.update

    # resume: weights, optimizer moments, step, metrics history and RNG states
    step, history, loss_history, best, run_id = 0, [], [], {"value": -1.0, "step": -1}, None
    resumed_epoch_stats = None
    if cfg.train.resume:
        state = load_checkpoint(cfg.train.resume)
        check_same_model(state, OmegaConf.to_container(cfg.model, resolve=True), cfg.train.resume)
        if state["config"]["mode"] != cfg.mode:
            raise UserError(f"checkpoint {cfg.train.resume} was trained with mode={state['config']['mode']}; pass mode={state['config']['mode']} to resume it")
        parts.load_state(state)
        step, history, best, run_id = state["step"], state["history"], state["best"], state.get("mlflow_run_id")
        loss_history = state.get("loss_history", [])
        resumed_epoch_stats = state.get("epoch_stats")
        restore_rng(state["rng"], device)
        log.info("resumed from %s at step %d (%d epochs done)", cfg.train.resume, step, step // steps_per_epoch)
        if step >= total_steps:
            log.warning("the checkpoint is at step %d, which is not below this run's %d steps; raise train.epochs "
                        "or train.max_steps to train further", step, total_steps)

    # tracking: reopen the resumed run when this store has it, else a new run that gets the history
    tracker, is_new_run = RunLogger.start(cfg, overrides, resume_run_id=run_id)
    run_title = cfg.tracking.run_name or run_name_from_overrides(overrides)
    if len(run_title) > 90:
        # keep the end, because the overrides that differ between runs of one multirun come last
        run_title = "..." + run_title[-87:]
    if not is_new_run:
        log.info("continuing MLflow run %s", tracker.run_id)
    for entry in history if is_new_run else []:
        tracker.log_metrics({k: v for k, v in entry.items() if "/" in k}, step=entry["step"])
    if HydraConfig.initialized():
        hydra_dir = Path(HydraConfig.get().runtime.output_dir) / ".hydra"
        if hydra_dir.is_dir():
            tracker.log_artifacts(hydra_dir, "hydra")
    tracker.set_tags({"pixelda.steps_per_epoch": steps_per_epoch})
    checkpoint_dir = Path(cfg.train.checkpoint_dir)
    figure_dir = checkpoint_dir.parent / "figures"

    # fixed inputs of the translation grid, so that grids of different evaluations compare
    shown = splits.source_test if len(splits.source_test) else splits.source_train
    count = min(cfg.train.grid_size, len(shown), len(splits.target_val))
    noise = torch.rand(count, cfg.model.generator.noise_dim, generator=torch.Generator().manual_seed(cfg.seed))
    grid = (as_input(shown.images[:count]), (noise * 2 - 1).to(device), as_input(splits.target_val.images[:count]))
    if is_new_run:
        preview = save_data_preview(as_input(splits.source_train.images[:count]), as_input(splits.target_train.images[:count]),
                                    figure_dir / "data_preview.png",
                                    f"data={cfg.data.name}: source train (top) and target train (bottom)")
        tracker.log_artifact(preview, "figures")

    def save_state(name: str) -> None:
        epoch_stats = None if epoch_sums is None else {"sums": epoch_sums.tolist(), "steps": epoch_steps}
        state = checkpoint_state(cfg, parts, step, steps_per_epoch, history, best, device, tracker.run_id, loss_history,
                                 epoch_stats)
        save_checkpoint(state, checkpoint_dir / name)

    def evaluate_now() -> dict:
        T = parts.eval_net("T")
        eval_args = (cfg.train.eval_batch_size, device, amp_dtype)
        metrics = {
            "test/source_acc": accuracy(T, splits.source_test, *eval_args),
            "val/target_acc": accuracy(T, splits.target_val, *eval_args),
            "test/target_acc": accuracy(T, splits.target_test, *eval_args),
        }
        # the domain gap: how much T loses when moving from the source to the target domain
        if metrics["test/source_acc"] is not None and metrics["test/target_acc"] is not None:
            metrics["test/domain_gap"] = metrics["test/source_acc"] - metrics["test/target_acc"]
        if metrics["test/source_acc"] is not None:
            metrics["val/domain_gap"] = metrics["test/source_acc"] - metrics["val/target_acc"]
        if cfg.mode == "pixelda":
            G = parts.eval_net("G")
            G.eval()
            with torch.inference_mode(), autocast(device, amp_dtype):
                translated = G(grid[0], grid[1])
            path = checkpoint_dir.parent / "images" / f"translation_step{step:07d}.png"
            save_translation_grid(grid[0], translated, grid[2], path, f"step {step}: source | G(source, z) | target")
            tracker.log_artifact(path, "images")
        for net in parts.run_nets.values():  # evaluation switched them to eval mode
            net.train()
        return metrics

    status = "FAILED"
    out_of_time = False
    epoch_sums, epoch_steps = None, 0
    # the budget covers everything from here on; the last evaluation and checkpoint may run past it
    time_budget = None if cfg.train.max_minutes is None else cfg.train.max_minutes * 60
    try:
        with StopRequest() as stop:
            for net in parts.nets.values():
                net.train()
            while step < total_steps and stop.signal_name is None and not out_of_time:
                epoch = step // steps_per_epoch
                epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)
                sums = torch.zeros(len(STAT_NAMES), device=device)
                epoch_sums = torch.zeros(len(STAT_NAMES), device=device)
                epoch_steps = 0
                if resumed_epoch_stats is not None and step % steps_per_epoch != 0:
                    # resumed mid-epoch: the epoch mean also covers the steps before the stop
                    epoch_sums += torch.tensor(resumed_epoch_stats["sums"], device=device)
                    epoch_steps = resumed_epoch_stats["steps"]
                resumed_epoch_stats = None
                interval, timed_steps, last, started = 0, 0, {}, time.perf_counter()
                bar = tqdm(total=epoch_end - step, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False,
                           disable=None if cfg.train.progress else True, dynamic_ncols=True)

                while step < epoch_end and stop.signal_name is None and not out_of_time:
                    # one step: batches of B images (and noise), then the mode's updates
                    update.progress, update.step_index = step / total_steps, step
                    stats = update(*batches(step))
                    for scheduler in parts.schedulers.values():
                        scheduler.step()
                    sums += stats
                    epoch_sums += stats
                    step += 1
                    interval += 1
                    epoch_steps += 1
                    timed_steps += 1
                    bar.update(1)
                    if time_budget is not None and time.perf_counter() - run_started > time_budget:
                        out_of_time = True
                        log.warning("stopping at step %d: train.max_minutes=%s is used up", step, cfg.train.max_minutes)
                        tracker.set_tags({"pixelda.stopped_by": "train.max_minutes"})

                    # logging: one device sync per interval, which is also where divergence is caught.
                    # Intervals end at multiples of log_every, so that a resumed run logs at the same
                    # steps as an uninterrupted one. An epoch's end and a stop also close an interval.
                    if step % cfg.train.log_every == 0 or step == epoch_end or out_of_time or stop.signal_name:
                        values = (sums / interval).tolist()
                        if not all(math.isfinite(v) for v in values):
                            listed = ", ".join(f"{n}={v:.4g}" for n, v in zip(STAT_NAMES, values))
                            raise TrainingDiverged(f"a loss became non-finite by step {step}: {listed}")
                        last = {n: v for n, v in zip(STAT_NAMES, values) if cfg.mode == "pixelda" or n == "loss_t"}
                        tracker.log_metrics({f"train/{n}": v for n, v in last.items()}, step=step)
                        loss_history.append({"step": step, **{f"train/{n}": v for n, v in last.items()}})
                        bar.set_postfix({n: f"{v:.4f}" for n, v in last.items()}, refresh=False)
                        sums.zero_()
                        interval = 0
                bar.close()
                if stop.signal_name is not None and step % steps_per_epoch != 0:
                    break  # stopped by a signal mid-epoch: save, but do not evaluate

                # evaluate in eval mode at the end of each epoch (and at the final step), then checkpoint
                rate = timed_steps * batch_size / max(time.perf_counter() - started, 1e-9)
                metrics = evaluate_now()
                metrics["train/images_per_sec"] = rate
                history.append({"epoch": step / steps_per_epoch, "step": step, **metrics})
                if metrics["val/target_acc"] > best["value"]:
                    # keep the test accuracies of the model that best.pt holds, for reports
                    best = {"value": metrics["val/target_acc"], "step": step}
                    best.update({f"{k}_at_best": metrics[k] for k in ("test/target_acc", "test/source_acc") if metrics[k] is not None})
                    save_state("best.pt")
                metrics["val/best_target_acc"] = best["value"]
                metrics.update({k: v for k, v in best.items() if k.endswith("_at_best")})
                tracker.log_metrics({**metrics, "epoch": step / steps_per_epoch}, step=step)
                save_state("last.pt")
                mean = dict(zip(STAT_NAMES, (epoch_sums / max(epoch_steps, 1)).tolist()))
                log.info(format_line(math.ceil(step / steps_per_epoch), cfg.train.epochs, step, last, mean, metrics, best["value"], rate))
                curves = save_curves(loss_history, history, figure_dir / "curves.png", f"{run_title}: losses and accuracies")
                tracker.log_artifact(curves, "figures")
                patience = cfg.train.stop_if_chance_after
                if patience is not None and len(history) >= patience and best["value"] <= cfg.train.chance_accuracy:
                    log.warning("stopping early: target validation is still at chance (best %.2f%% <= %.1f%%) after %d evaluations",
                                best["value"], cfg.train.chance_accuracy, len(history))
                    tracker.set_tags({"pixelda.stopped_by": "train.stop_if_chance_after"})
                    break

            if stop.signal_name is not None:
                save_state("last.pt")
            status = "KILLED" if stop.signal_name is not None else "FINISHED"
            if status == "FINISHED" and (checkpoint_dir / "best.pt").is_file():
                best_state = load_checkpoint(checkpoint_dir / "best.pt")
                for path in final_figures(best_state, cfg.model, splits, grid[0], grid[1], figure_dir, device, amp_dtype,
                                          cfg.train.eval_batch_size):
                    tracker.log_artifact(path, "figures")
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if cfg.tracking.log_checkpoints and status != "FAILED":
            for name in ("best.pt", "last.pt"):
                if (checkpoint_dir / name).is_file():
                    tracker.log_artifact(checkpoint_dir / name, "checkpoints")
        tracker.end(status)

    if status == "KILLED":
        kept = [o for o in overrides if not o.startswith("train.resume=")]
        log.warning("interrupted at step %d; resume with: python -m pixelda.train %s train.resume=%s",
                    step, " ".join(kept), (checkpoint_dir / "last.pt").resolve())
        # the shell's convention for a process ended by a signal: 130 for SIGINT, 143 for SIGTERM
        sys.exit(128 + signal.Signals[stop.signal_name].value)
    if checkpoint_dir.is_dir():
        log.info("best target validation %.2f%% at step %d; checkpoints in %s", best["value"], best["step"], checkpoint_dir)
    else:
        log.info("best target validation %.2f%% at step %d; no checkpoint written (no steps were left to train)",
                 best["value"], best["step"])
    return best["value"]


def check_group_choices(argv: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Reject `group=option` arguments that name no file in conf/group/, in one line.

    Hydra reports the same mistake over several lines with its config search path.
    """
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        group_dir = conf_dir / key
        # hydra/... groups also have options that plugins register in code, so Hydra checks those
        if not sep or "." in key or "/" in key or not group_dir.is_dir() or "(" in value:
            continue
        options = sorted(p.stem for p in group_dir.glob("*.yaml"))
        for choice in value.split(","):
            if choice != "null" and choice not in options:
                raise UserError(f"unknown {key} '{choice}'; choose one of {', '.join(options)} (the files in conf/{key}/)")


register_configs()


@hydra.main(config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    with report_user_errors(reraise=hydra_cfg.mode == RunMode.MULTIRUN):
        best = train(cfg, overrides=list(hydra_cfg.overrides.task))
    # some versions of the Optuna sweeper crash on a NaN objective, so never hand one over
    if not math.isfinite(best):
        raise TrainingDiverged(f"the best target-validation accuracy is {best}")
    return best


if __name__ == "__main__":
    with report_user_errors():
        check_group_choices(sys.argv[1:])
    main()
