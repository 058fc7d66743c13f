"""Measure pixelda against the notebook-style loop, side by side in one run, and print a table.

    python benchmarks/run.py            # what `make bench` runs
    python benchmarks/run.py --quick    # seconds, for the test suite; timings are meaningless

The last line of the output is one JSON object with train_speedup, preprocess_speedup and
eval_speedup, plus the correctness check and the peak memory figures.
"""

from __future__ import annotations

import pixelda  # noqa: F401  (first, so that its runtime settings apply before torch loads)

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from notebook_baseline import (  # noqa: E402
    NotebookClassifier,
    NotebookDiscriminator,
    NotebookGenerator,
    NotebookLoop,
    copy_weights,
    notebook_accuracy,
    preprocess_with_pil,
)

from hydra import compose, initialize_config_dir  # noqa: E402

import pixelda.train  # noqa: E402,F401  (registers the config schema)
from pixelda.data import Split, build_splits, read_embedded_mnist, to_chw32, to_model_input  # noqa: E402
from pixelda.model import MaxPool2x2  # noqa: E402
from pixelda.runtime import accuracy, pick_device, resolve_precision  # noqa: E402
from pixelda.train import StepInputs, build_training  # noqa: E402

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# Each lever alone on top of the plain fp32 eager step, then pixelda's default.
PLAIN = ["train.precision=fp32", "train.channels_last=false", "train.compile=false", "optimizer.fused=false"]
LEVERS = {
    "+ bf16 autocast": ["train.precision=bf16"],
    "+ channels_last": ["train.channels_last=true"],
    "+ fused Adam": ["optimizer.fused=true"],
    "+ torch.compile": ["train.compile=true"],
}
# Tolerances of the float64 correctness check: relative error of the losses (returned as float32)
# and relative L2 error of each network's gradient and parameter update.
LOSS_RTOL = 1e-6
GRAD_RTOL = 1e-9


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR)):
        return compose("train", overrides=overrides)


def notebook_classifier(classifier_cfg, dropout=None) -> NotebookClassifier:
    c = classifier_cfg
    return NotebookClassifier(c.conv1, c.conv2, c.hidden, c.dropout if dropout is None else dropout)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step: Callable[[], object], device: torch.device, warmup: int, steps: int) -> float:
    """Median seconds per call of step after warmup calls."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def summarize(rates: list[float]) -> dict:
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}


# ---------------------------------------------------------------------------------------------
# training step


def pixelda_runner(cfg, splits, device):
    """Build pixelda's step exactly as train.py does and return a callable for one step."""
    amp_dtype = resolve_precision(cfg.train.precision, device)
    parts = build_training(cfg, device, amp_dtype)
    inputs = StepInputs(splits, "pixelda", cfg.train.batch_size, cfg.seed, cfg.model.generator.noise_dim, device)
    counter = iter(range(10**9))
    sums = torch.zeros(5, device=device)

    def step():
        nonlocal sums
        sums += parts.update(*inputs(next(counter)))

    return parts.nets, step


def notebook_runner(cfg, splits, device, nets):
    """The notebook loop on float copies of the same splits, starting from the same weights."""
    G = NotebookGenerator(cfg.model.generator.blocks, cfg.model.generator.filters, cfg.model.generator.noise_dim)
    D = NotebookDiscriminator(cfg.model.discriminator.filters, cfg.model.discriminator.noise_std, cfg.model.discriminator.dropout)
    T = notebook_classifier(cfg.model.classifier)
    for ours, theirs in ((nets["G"], G), (nets["D"], D), (nets["T"], T)):
        copy_weights(ours, theirs)
    G, D, T = G.to(device), D.to(device), T.to(device)
    source_x = to_model_input(splits.source_train.images.cpu())
    target_x = to_model_input(splits.target_train.images.cpu())
    loop = NotebookLoop(G, D, T, source_x, splits.source_train.labels.cpu(), target_x, batch_size=cfg.train.batch_size,
                        alpha=cfg.loss.alpha, beta=cfg.loss.beta, g_loss_weight=cfg.loss.g_loss_weight,
                        noise_dim=cfg.model.generator.noise_dim)

    def step():
        xs, ys, xt = loop.next_batch()
        loop.step(xs.to(device), ys.to(device), xt.to(device), (torch.rand(xs.size(0), loop.noise_dim) * 2 - 1).to(device))

    return step


def check_same_math(base_overrides: list[str], splits, device: torch.device, dtype: torch.dtype, steps: int = 2) -> dict:
    """Run pixelda's fp32 code path and the notebook step from the same weights on the same batches.

    D's noise and all dropout are off, so that both are deterministic; everything else (channels_last,
    one D and one T pass over both batches, frozen D and T during G's update, losses on logits)
    stays as pixelda's default has it. Gradients are captured just before each optimizer step,
    because the notebook's G update also adds into D's and T's gradients. In float64 rounding stays
    far below the tolerances, so a failure means different math. In float32 the relative error of G's
    gradient grows to about 1e-3, because its backward pass through BatchNorm amplifies rounding.
    """
    overrides = base_overrides + ["train.precision=fp32", "train.compile=false", "model.discriminator.noise_std=0",
                                  "model.discriminator.dropout=0", "model.classifier.dropout=0"]
    cfg = compose_config(overrides)
    torch.manual_seed(0)
    parts = build_training(cfg, device, None)
    for net in parts.nets.values():
        net.to(dtype)
    G = NotebookGenerator(cfg.model.generator.blocks, cfg.model.generator.filters, cfg.model.generator.noise_dim)
    D = NotebookDiscriminator(cfg.model.discriminator.filters, 0.0, 0.0)
    T = notebook_classifier(cfg.model.classifier, dropout=0.0)
    theirs = {"G": G.to(device, dtype), "D": D.to(device, dtype), "T": T.to(device, dtype)}
    for name, net in theirs.items():
        copy_weights(parts.nets[name], net)
    placeholder = torch.zeros(1, 3, 32, 32, dtype=dtype)  # the check feeds batches itself, not through the loaders
    loop = NotebookLoop(G, D, T, placeholder, torch.zeros(1, dtype=torch.long), placeholder, alpha=cfg.loss.alpha,
                        beta=cfg.loss.beta, g_loss_weight=cfg.loss.g_loss_weight, noise_dim=cfg.model.generator.noise_dim)
    grads: dict[tuple[str, str], torch.Tensor] = {}

    def capture(key):
        def hook(optimizer, args, kwargs):
            grads[key] = torch.cat([p.grad.flatten() for group in optimizer.param_groups for p in group["params"]])
        return hook

    for name, optimizer in parts.optimizers.items():
        optimizer.register_step_pre_hook(capture(("pixelda", name)))
    for name, optimizer in (("G", loop.opt_g), ("D", loop.opt_d), ("T", loop.opt_t)):
        optimizer.register_step_pre_hook(capture(("notebook", name)))

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    inputs = StepInputs(splits, "pixelda", cfg.train.batch_size, 0, cfg.model.generator.noise_dim, device)
    loss_error, grad_error, update_error = 0.0, {}, {}
    for step in range(steps):
        xs, ys, xt, z = (t.to(dtype) if t.is_floating_point() else t for t in inputs(step))
        before = {name: torch.cat([p.detach().flatten() for p in net.parameters()]) for name, net in parts.nets.items()}
        ours = parts.update(xs, ys, xt, z)[:3].tolist()
        reference = loop.step(xs, ys, xt, z)
        loss_error = max(loss_error, max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours, reference)))
        for name in ("D", "T", "G"):
            grad_error[name] = max(grad_error.get(name, 0.0), relative(grads[("pixelda", name)], grads[("notebook", name)]))
            after_ours = torch.cat([p.detach().flatten() for p in parts.nets[name].parameters()])
            after_theirs = torch.cat([p.detach().flatten() for p in theirs[name].parameters()])
            update_error[name] = max(update_error.get(name, 0.0), relative(after_ours - before[name], after_theirs - before[name]))
            # start the next step from identical weights, so that errors do not compound
            copy_weights(parts.nets[name], theirs[name])
    return {"dtype": str(dtype).replace("torch.", ""), "steps": steps, "max_loss_rel_error": loss_error,
            "max_grad_rel_error": grad_error, "max_update_rel_error": update_error}


def same_math_checks(base_overrides: list[str], splits, device: torch.device) -> dict:
    """The check in float64 (pass/fail) and in float32 (reported)."""
    exact = check_same_math(base_overrides, splits, device, torch.float64)
    # the step returns its losses as float32, hence the looser loss tolerance
    passed = exact["max_loss_rel_error"] <= LOSS_RTOL and worst_of(exact) <= GRAD_RTOL
    return {"passed": passed, "float64": exact, "float32": check_same_math(base_overrides, splits, device, torch.float32),
            "loss_rtol": LOSS_RTOL, "grad_update_rtol": GRAD_RTOL}


def worst_of(check: dict) -> float:
    return max(*check["max_grad_rel_error"].values(), *check["max_update_rel_error"].values())


def count_step_flops(cfg, splits, device) -> float:
    """FLOPs of one pixelda step, counted by torch's FlopCounterMode (convs and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    nets, step = pixelda_runner(compose_config(list(cfg) + ["train.compile=false"]), splits, device)
    step()  # the first step allocates optimizer state
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def bench_train(args, device: torch.device) -> dict:
    default = [f"train.batch_size={args.batch_size}"] + (["model=tiny"] if args.quick else [])
    cfg = compose_config(default)
    splits = build_splits(cfg.data)
    for name in ("source_train", "target_train"):
        split = getattr(splits, name)
        split.images = split.images.to(device)
        split.labels = None if split.labels is None else split.labels.to(device)

    torch.manual_seed(0)
    default_nets, default_step = pixelda_runner(cfg, splits, device)
    variants = {"pixelda default": default_step,
                "notebook loop (baseline)": notebook_runner(cfg, splits, device, default_nets)}
    variants["pixelda, every lever off"] = pixelda_runner(compose_config(default + PLAIN), splits, device)[1]
    for name, extra in LEVERS.items():
        if args.quick and "train.compile=true" in extra:
            continue
        variants[name] = pixelda_runner(compose_config(default + PLAIN + extra), splits, device)[1]

    rates: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, step in variants.items():
            seconds = time_steps(step, device, warmup=args.warmup if repeat == 0 else 2, steps=args.steps)
            rates[name].append(args.batch_size / seconds)
    result = {name: summarize(values) for name, values in rates.items()}
    baseline = result["notebook loop (baseline)"]["median"]
    for name in result:
        result[name]["ratio"] = result[name]["median"] / baseline

    flops = count_step_flops(default, splits, device)
    seconds_per_step = args.batch_size / result["pixelda default"]["median"]
    return {"rates": result, "step_gflop": flops / 1e9, "achieved_gflops": flops / seconds_per_step / 1e9,
            "check": same_math_checks(default, splits, device), "config": {"precision": cfg.train.precision,
            "channels_last": cfg.train.channels_last, "compile": cfg.train.compile, "fused": cfg.optimizer.get("fused")}}


# ---------------------------------------------------------------------------------------------
# preprocessing and evaluation


def bench_preprocess(args) -> dict:
    """The notebook's PIL loop against pixelda's uint8 store, and against the store plus batch scaling.

    Each figure is the median of args.repeats timings, after one untimed call of each path.

    pixelda scales each batch to floats when the batch is formed, which the training-step timing
    already includes; the second figure adds that scaling for every image once more.
    """
    digits = read_embedded_mnist().images
    count = args.preprocess_images
    images = np.concatenate([digits] * (count // len(digits) + 1))[:count]

    def median_seconds(work: Callable[[], object]) -> float:
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            work()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    def scale_every_batch() -> None:
        for start in range(0, count, args.batch_size):
            to_model_input(stored[start:start + args.batch_size])

    pil = preprocess_with_pil(images)
    stored = to_chw32(images)  # what pixelda keeps: uint8, N x 1 x 32 x 32; also the warm-up
    pil_seconds = median_seconds(lambda: preprocess_with_pil(images))
    store_seconds = median_seconds(lambda: to_chw32(images))
    scaling_seconds = median_seconds(scale_every_batch)

    ours = to_model_input(stored)
    return {"images": count, "pil_seconds": pil_seconds, "pixelda_seconds": store_seconds,
            "speedup": pil_seconds / store_seconds, "batch_scaling_seconds": scaling_seconds,
            "speedup_with_batch_scaling": pil_seconds / (store_seconds + scaling_seconds),
            "max_abs_difference": float((ours - pil).abs().max()), "mean_abs_difference": float((ours - pil).abs().mean()),
            "bytes_per_image": {"pil_float": pil[0].numel() * 4, "pixelda_uint8": stored[0].numel()}}


def with_reference_pooling(T: nn.Module) -> nn.Module:
    """Copy T with the notebook's pooling: ReLU, then max_pool2d with its argmax indices."""
    T = copy.deepcopy(T)
    layers = list(T.features)
    for i, layer in enumerate(layers):
        if isinstance(layer, MaxPool2x2):
            layers[i] = nn.MaxPool2d(2)
            if i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU):
                layers[i], layers[i + 1] = layers[i + 1], layers[i]
    T.features = nn.Sequential(*layers)
    return T


def bench_eval(args, device: torch.device) -> dict:
    """Time target-test evaluation: pixelda's accuracy() against a DataLoader loop in eval mode.

    Each evaluation lever is also timed alone on top of pixelda's loop with every lever off, and
    left out of the default.

    T is first trained for a few source-only steps, so that its predictions are not near-ties and
    the accuracies show what bf16 changes.
    """
    cfg = compose_config(["mode=source_only"] + (["model=tiny"] if args.quick else []))
    splits = build_splits(cfg.data)
    torch.manual_seed(0)
    amp_dtype = resolve_precision(cfg.train.precision, device)
    parts = build_training(cfg, device, amp_dtype)
    for split in (splits.source_train,):
        split.images, split.labels = split.images.to(device), split.labels.to(device)
    inputs = StepInputs(splits, "source_only", cfg.train.batch_size, 0, cfg.model.generator.noise_dim, device)
    for step in range(args.eval_train_steps):
        parts.update(*inputs(step))
    T = parts.nets["T"]
    notebook_T = notebook_classifier(cfg.model.classifier).to(device)
    copy_weights(T, notebook_T)

    repeat = max(1, args.eval_images // len(splits.target_test))
    images = splits.target_test.images.repeat(repeat, 1, 1, 1)
    labels = splits.target_test.labels.repeat(repeat)
    split = Split(images.to(device), labels.to(device))
    float_images = to_model_input(images)

    # a lever's gain can depend on the others, so each is measured alone on top of every lever off
    # and as the one lever left out of the default
    big, bf16 = cfg.train.eval_batch_size, amp_dtype or torch.bfloat16
    nets = {(False, False): with_reference_pooling(T).to(memory_format=torch.contiguous_format),
            (False, True): copy.deepcopy(T).to(memory_format=torch.contiguous_format)}
    nets[(True, False)] = nets[(False, False)].to(memory_format=torch.channels_last)
    nets[(True, True)] = nets[(False, True)].to(memory_format=torch.channels_last)

    def evaluation(batch: int, dtype, nhwc: bool, fast_pool: bool) -> Callable[[], float]:
        return lambda: accuracy(nets[(nhwc, fast_pool)], split, batch, device, dtype)

    default = dict(batch=big, dtype=bf16, nhwc=True, fast_pool=True)
    off = dict(batch=32, dtype=None, nhwc=False, fast_pool=False)
    levers = {f"batch {big}": "batch", "bf16 weights and inputs": "dtype", "channels_last": "nhwc", "pooling without indices": "fast_pool"}
    variants = {"pixelda default": lambda: accuracy(T, split, big, device, amp_dtype),
                "DataLoader loop (baseline)": lambda: notebook_accuracy(notebook_T, float_images, labels, device=device),
                "pixelda, every lever off": evaluation(**off)}
    for name, key in levers.items():
        variants[f"+ {name}"] = evaluation(**{**off, key: default[key]})
    for name, key in levers.items():
        variants[f"default without {name}"] = evaluation(**{**default, key: off[key]})

    rates: dict[str, list[float]] = {name: [] for name in variants}
    accuracies = {}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            started = time.perf_counter()
            accuracies[name] = fn()
            sync(device)
            rates[name].append(len(labels) / (time.perf_counter() - started))
    result = {name: summarize(values) for name, values in rates.items()}
    baseline = result["DataLoader loop (baseline)"]["median"]
    for name in result:
        result[name]["ratio"] = result[name]["median"] / baseline
        result[name]["accuracy"] = accuracies[name]
    ours = result["pixelda default"]
    return {"images": len(labels), "rates": result, "pixelda_images_per_sec": ours["median"], "notebook_images_per_sec": baseline,
            "speedup": ours["ratio"], "pixelda_accuracy": ours["accuracy"], "notebook_accuracy": accuracies["DataLoader loop (baseline)"],
            "pixelda_settings": f"batch {cfg.train.eval_batch_size}, precision {cfg.train.precision}, channels_last {cfg.train.channels_last}"}


# ---------------------------------------------------------------------------------------------
# peak memory of holding the full protocol (70,000 source and 70,000 target images)


def bench_memory(args) -> dict:
    out = {}
    for kind in ("pixelda", "notebook"):
        probe = Path(__file__).resolve().parent / "memory_probe.py"
        command = [sys.executable, str(probe), kind, "--images", str(args.memory_images), "--device", args.device]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        out[kind] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


# ---------------------------------------------------------------------------------------------


def print_table(report: dict) -> None:
    train, check = report["train"], report["train"]["check"]
    print(f"\npixelda benchmark, {report['date']}, {report['machine']}, torch {report['torch']}, device {report['device']}")
    print(f"\ntraining step, batch {report['batch_size']}: images/s, median of {report['repeats']} repeats (min-max)")
    for name, r in train["rates"].items():
        print(f"  {name:<28} {r['median']:8.1f}  ({r['min']:.1f}-{r['max']:.1f})  {r['ratio']:5.2f}x")
    print(f"  one step = {train['step_gflop']:.2f} GFLOP; pixelda default reaches {train['achieved_gflops']:.1f} GFLOP/s")
    exact, single = check["float64"], check["float32"]
    print(f"  same math check, {exact['steps']} steps from the same weights, noise and dropout off: "
          f"{'passed' if check['passed'] else 'FAILED'} in float64 (loss rel. error {exact['max_loss_rel_error']:.1e}, "
          f"gradient and update rel. error {worst_of(exact):.1e}, tolerances {check['loss_rtol']:.0e} and {check['grad_update_rtol']:.0e})")
    print(f"  in float32: loss rel. error {single['max_loss_rel_error']:.1e}; gradient rel. error "
          + ", ".join(f"{k} {v:.1e}" for k, v in single["max_grad_rel_error"].items()))
    p = report["preprocess"]
    print(f"\npreprocessing {p['images']} digits, median of {report['repeats']}: PIL loop {p['pil_seconds']:.2f} s, pixelda uint8 store {p['pixelda_seconds']:.3f} s "
          f"-> {p['speedup']:.1f}x; with the scaling of every batch ({p['batch_scaling_seconds']:.3f} s) "
          f"{p['speedup_with_batch_scaling']:.1f}x; max abs. difference {p['max_abs_difference']:.4f} on the [-1, 1] scale")
    e = report["eval"]
    print(f"\nevaluation of {e['images']} target images: images/s, median of {report['repeats']} repeats (min-max), accuracy")
    for name, r in e["rates"].items():
        print(f"  {name:<40} {r['median']:8.0f}  ({r['min']:.0f}-{r['max']:.0f})  {r['ratio']:5.2f}x  {r['accuracy']:.2f}%")
    if "memory" in report:
        for kind, m in report["memory"].items():
            extra = f", CUDA max allocated {m['cuda_max_allocated_mb']:.0f} MB" if "cuda_max_allocated_mb" in m else ""
            print(f"memory, {kind:<8} holding {m['images_per_domain']} + {m['images_per_domain']} images: "
                  f"peak RSS {m['peak_rss_mb']:.0f} MB, data {m['held_mb']:.0f} MB{extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes for the test suite; timings are meaningless")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=15, help="timed training steps per repeat")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before the first repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preprocess-images", type=int, default=70_000)
    parser.add_argument("--eval-images", type=int, default=10_000)
    parser.add_argument("--eval-train-steps", type=int, default=150, help="source-only steps that train T before it is evaluated")
    parser.add_argument("--memory-images", type=int, default=70_000)
    args = parser.parse_args()

    if args.quick:
        args.steps, args.warmup, args.repeats = 2, 1, 1
        args.preprocess_images, args.eval_images, args.memory_images, args.eval_train_steps = 500, 1000, 500, 2

    device = pick_device(args.device)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}",
              "torch": torch.__version__, "device": str(device), "batch_size": args.batch_size, "repeats": args.repeats}
    if device.type == "cuda":
        report["device"] = torch.cuda.get_device_name(device)
    report["train"] = bench_train(args, device)
    report["preprocess"] = bench_preprocess(args)
    report["eval"] = bench_eval(args, device)
    report["memory"] = bench_memory(args)
    print_table(report)
    summary = {
        "train_speedup": report["train"]["rates"]["pixelda default"]["ratio"],
        "preprocess_speedup": report["preprocess"]["speedup"],
        "eval_speedup": report["eval"]["speedup"],
        "correctness_passed": report["train"]["check"]["passed"],
        "peak_rss_mb": report["memory"]["pixelda"]["peak_rss_mb"],
        "report": report,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
