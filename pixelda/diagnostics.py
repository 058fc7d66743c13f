"""Figures that judge a trained model: nearest neighbours of translations, misclassified target
images and the confusion matrix. train.py logs them at the end of a run, from best.pt."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from pixelda.data import Splits, to_model_input
from pixelda.figures import save_confusion_matrix, save_misclassified, save_nearest_neighbours
from pixelda.model import build_networks
from pixelda.runtime import autocast, predict

log = logging.getLogger(__name__)


def labelled_target_split(splits: Splits) -> tuple[str, object]:
    """Target test, or target validation when the test split is empty (the small protocol)."""
    if len(splits.target_test):
        return "target test", splits.target_test
    return "target validation (the target test split is empty)", splits.target_val


def final_figures(state: dict, model_cfg, splits: Splits, grid_source: Optional[torch.Tensor], grid_noise: Optional[torch.Tensor],
                  folder: Path, device: torch.device, dtype: Optional[torch.dtype], batch_size: int) -> list[Path]:
    """Draw the end-of-run figures from a checkpoint's weights (weight averages where present)."""
    nets = build_networks(model_cfg)
    weights = {**state["nets"], **state.get("averages", {})}
    T = nets["T"].to(device)
    T.load_state_dict(weights["T"])
    name, split = labelled_target_split(splits)
    predicted = predict(T, split.images, batch_size, device, dtype).cpu()
    labels = split.labels.cpu()
    step = state["step"]
    paths = [
        save_confusion_matrix(predicted, labels, folder / "confusion_matrix.png", f"T of best.pt (step {step}) on {name}"),
        save_misclassified(to_model_input(split.images.cpu()), predicted, labels, folder / "misclassified.png",
                           f"misclassified {name} images, T of best.pt (step {step})"),
    ]
    if "G" in weights and grid_source is not None:
        G = nets["G"].to(device).eval()
        G.load_state_dict(weights["G"])
        with torch.inference_mode(), autocast(device, dtype):
            translated = G(grid_source[:6], grid_noise[:6]).float().cpu()
        paths.append(save_nearest_neighbours(translated, splits.target_train.images.cpu(), folder / "nearest_neighbours.png",
                                             f"G of best.pt (step {step}): translations and their nearest target-train images (L2, pixels)"))
    return paths
