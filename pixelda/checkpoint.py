"""Atomic checkpoint files and their safe loading.

A checkpoint is a dict of tensors and plain Python values, so it loads with
`torch.load(weights_only=True)`:
    format        CHECKPOINT_FORMAT
    config        the resolved run config as a plain dict
    nets          state dicts of G, D and T (those the mode trains)
    optimizers    state dicts of their optimizers
    step, epoch   optimizer steps and completed epochs so far
    history       one dict of metrics per evaluation
    best          {"value": best target-validation accuracy, "step": its step}
    rng           torch RNG states (CPU and CUDA)
    mlflow_run_id the MLflow run that the training logged to
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from pixelda.errors import UserError

CHECKPOINT_FORMAT = 1


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write state to path atomically: a crash mid-write leaves the previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a pixelda checkpoint on the CPU, with weights_only=True so that no pickled code runs."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}; pass the path of a last.pt or best.pt file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise UserError(f"cannot load checkpoint {path} ({type(err).__name__}); the file is corrupt or not a pixelda checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a pixelda checkpoint (format {CHECKPOINT_FORMAT}); pass a last.pt or best.pt written by pixelda.train")
    return state


def describe_model(model_cfg: dict) -> str:
    """One-line summary of a model config, for mismatch messages."""
    g = model_cfg["generator"]
    return f"model={model_cfg['name']} (G: {g['blocks']} blocks x {g['filters']} filters, noise {g['noise_dim']})"


def check_same_model(checkpoint: dict[str, Any], model_cfg: dict, path: str | Path) -> None:
    """Raise UserError when the checkpoint was trained with another model config than model_cfg."""
    saved = checkpoint["config"]["model"]
    if saved != model_cfg:
        raise UserError(
            f"checkpoint {path} was trained with {describe_model(saved)} but this run has "
            f"{describe_model(model_cfg)}; pass model={saved['name']} (and the same model.* overrides) "
            "or start a new run without train.resume"
        )
