"""Shared fixtures: the real Hydra config shrunk to tiny sizes, generated data files, the shared data folder."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import pixelda.train  # noqa: F401  (registers the config schema)

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
# Real public data beside the checkout; tests that need it skip when it is absent.
SHARED_DATA = Path(os.environ.get("PIXELDA_SHARED_DATA", REPO.parent / "shared" / "data"))

# Overrides that shrink the default run to seconds: tiny networks, 64 training images, 2 steps.
TINY = [
    "model=tiny",
    "train.batch_size=8",
    "train.epochs=1",
    "train.max_steps=2",
    "train.log_every=1",
    "train.eval_batch_size=64",
    "train.progress=false",
    "data.source_train.stop=64",
    "data.target_train.stop=64",
    "data.target_val.stop=3064",
    "data.source_test.stop=4064",
    "data.target_test.stop=4064",
]


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose conf/train.yaml with overrides, as `python -m pixelda.train` would."""
    with initialize_config_dir(config_dir=str(CONF_DIR)):
        return compose("train", overrides=overrides)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for the whole session, so the embedded target is generated once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def tiny_overrides(tmp_path, cache_dir) -> list[str]:
    return TINY + [
        f"data.cache_dir={cache_dir}",
        f"tracking.uri=sqlite:///{tmp_path}/mlruns/mlflow.db",
        f"train.checkpoint_dir={tmp_path}/checkpoints",
    ]


@pytest.fixture
def tiny_cfg(tiny_overrides) -> DictConfig:
    return compose_config(tiny_overrides)


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "MNIST" / "raw").is_dir() or not (SHARED_DATA / "mnist_m").is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA


def run_cli(module: str, *args: str, cwd: Path, cache_dir: Path, timeout: float = 600, **popen) -> subprocess.CompletedProcess:
    """Run `python -m module args` as a user would, with the data cache in cache_dir."""
    env = {**os.environ, "PIXELDA_CACHE_DIR": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, **popen)


# ---------------------------------------------------------------------------------------------
# generated data files in the formats users have


def write_idx(path: Path, array: np.ndarray, magic: int) -> Path:
    """Write an IDX file (gzipped when path ends in .gz) with big-endian dimension sizes."""
    header = magic.to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def make_digits(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random stroke-like grey digits (uint8, count x 28 x 28) and labels 0-9."""
    rng = np.random.default_rng(seed)
    images = np.zeros((count, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=count)
    for i, label in enumerate(labels):
        images[i, 4:24, 8 + label: 12 + label] = 255  # a bar whose position encodes the label
    return images, labels.astype(np.uint8)


def write_mnist_folder(folder: Path, count: int = 40, gz: bool = True, parts: tuple[str, ...] = ("test",)) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = make_digits(count)
    suffix = ".gz" if gz else ""
    for part in parts:
        prefix = "t10k" if part == "test" else "train"
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, 2051)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, 2049)
    return images, labels


def write_mnistm_folder(folder: Path, count: int = 40, part: str = "test", seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=count)
    image_dir = folder / f"mnist_m_{part}"
    image_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        name = f"{i:08d}.png"
        Image.fromarray(images[i]).save(image_dir / name)
        lines.append(f"{name} {labels[i]}")
    (folder / f"mnist_m_{part}_labels.txt").write_text("\n".join(lines) + "\n")
    return images, labels


@pytest.fixture
def small_protocol_root(tmp_path) -> Path:
    """A data.root laid out like the shared folder, with 40 generated images per domain."""
    root = tmp_path / "data"
    write_mnist_folder(root / "MNIST" / "raw", count=40)
    write_mnistm_folder(root / "mnist_m", count=40)
    return root


def small_protocol_overrides(root: Path) -> list[str]:
    """Splits of the small protocol scaled down to the 40 generated images."""
    return [
        "data=mnist_mnistm_small",
        f"data.root={root}",
        "data.source_train.stop=24",
        "data.target_train.stop=24",
        "data.target_val.start=24",
        "data.target_val.stop=32",
        "data.source_test.start=32",
        "data.source_test.stop=40",
        "data.target_test.start=32",
        "data.target_test.stop=40",
    ]
