"""Peak memory of holding the full protocol and training on it, in a fresh process.

    python benchmarks/memory_probe.py pixelda|notebook [--images 70000] [--device cpu]

Prints one JSON line. The images are random (only their number and size matter here): `--images`
MNIST-sized source digits and as many MNIST-M-sized target images, then three training steps.
"""

from __future__ import annotations

import pixelda  # noqa: F401  (first, so that its runtime settings apply before torch loads)

import argparse
import json
import resource
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def random_images(count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8), rng.integers(0, 10, size=count).astype(np.int64),
            rng.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8))


def hold_pixelda(count: int, device: torch.device) -> list[torch.Tensor]:
    """Keep the images as pixelda.train does (uint8 after reading), then run three training steps."""
    from hydra import compose, initialize_config_dir

    import pixelda.train  # noqa: F401  (registers the config schema)
    from pixelda.data import Split, Splits, to_chw32
    from pixelda.runtime import resolve_precision
    from pixelda.train import StepInputs, build_training

    source, labels, target = random_images(count)
    empty = Split(torch.zeros(0, 3, 32, 32, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    splits = Splits(source_train=Split(to_chw32(source).to(device), torch.from_numpy(labels).to(device)),
                    source_test=empty, target_train=Split(to_chw32(target).to(device), None), target_val=empty, target_test=empty)
    del source, target  # build_splits drops the decoded files the same way
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parent.parent / "conf")):
        cfg = compose("train")
    update = build_training(cfg, device, resolve_precision(cfg.train.precision, device)).update
    inputs = StepInputs(splits, "pixelda", cfg.train.batch_size, 0, cfg.model.generator.noise_dim, device)
    for step in range(3):
        update(*inputs(step))
    return [splits.source_train.images, splits.target_train.images]


def hold_notebook(count: int, device: torch.device) -> list[torch.Tensor]:
    """Keep the images as the notebook did (float tensors), then run three training steps."""
    from notebook_baseline import NotebookClassifier, NotebookDiscriminator, NotebookGenerator, NotebookLoop, preprocess_with_pil

    source, labels, target = random_images(count)
    source_x = preprocess_with_pil(source)
    target_x = torch.from_numpy(target).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    loop = NotebookLoop(NotebookGenerator().to(device), NotebookDiscriminator().to(device), NotebookClassifier().to(device),
                        source_x, torch.from_numpy(labels), target_x)
    del source, target
    for _ in range(3):
        xs, ys, xt = loop.next_batch()
        loop.step(xs.to(device), ys.to(device), xt.to(device), (torch.rand(xs.size(0), 100) * 2 - 1).to(device))
    return [source_x, target_x]


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM). Unlike ru_maxrss it does not carry over the
    peak of the parent process across fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["pixelda", "notebook"])
    parser.add_argument("--images", type=int, default=70_000)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))

    held = (hold_pixelda if args.kind == "pixelda" else hold_notebook)(args.images, device)

    result = {"kind": args.kind, "images_per_domain": args.images,
              "peak_rss_mb": peak_rss_mb(),
              "held_mb": sum(t.numel() * t.element_size() for t in held) / 2**20}
    if device.type == "cuda":
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))


if __name__ == "__main__":
    main()
