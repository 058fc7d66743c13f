"""PNG figures that runs log to MLflow: curves, translations, nearest neighbours, errors, confusion.

Every function takes images as float tensors in [-1, 1] (N x 3 x H x W), writes one PNG and
returns its path. Matplotlib runs on the Agg backend, so no display is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # no display is needed, and none exists on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

DPI = 80


def to_display(images: torch.Tensor) -> np.ndarray:
    """Map a batch in [-1, 1] (N x 3 x H x W) to floats in [0, 1], N x H x W x 3, for imshow."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _image_axes(ax, picture: np.ndarray, title: Optional[str] = None) -> None:
    ax.imshow(picture, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def _save_image_rows(rows: Sequence[tuple[str, torch.Tensor]], path: Path, title: str, height: float) -> Path:
    """Save one labelled row of images per (label, batch) pair as one PNG."""
    columns = rows[0][1].shape[0]
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.1 * columns + 1.2, height), squeeze=False)
    for r, (label, images) in enumerate(rows):
        pictures = to_display(images)
        for c in range(columns):
            _image_axes(axes[r][c], pictures[c])
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def save_translation_grid(source: torch.Tensor, translated: torch.Tensor, target: torch.Tensor,
                          path: Path, title: str) -> Path:
    """Save three labelled rows, source | G(source, z) | real target images, as one PNG."""
    rows = [("source x_s", source), ("translated G(x_s, z)", translated), ("real target x_t", target)]
    return _save_image_rows(rows, path, title, height=3.7)


def save_data_preview(source: torch.Tensor, target: torch.Tensor, path: Path, title: str) -> Path:
    """Save source samples (top row) beside target samples (bottom row)."""
    return _save_image_rows([("source", source), ("target", target)], path, title, height=2.6)


def save_curves(loss_history: Sequence[dict], eval_history: Sequence[dict], path: Path, title: str) -> Path:
    """Plot each training loss and the accuracies against the step.

    loss_history has one dict {"step", "train/loss_d", ...} per log interval, and eval_history one
    dict {"step", "val/target_acc", ...} per evaluation.
    """
    losses = [("train/loss_d", "loss of D"), ("train/loss_t", "loss of T"), ("train/loss_g", "loss of G")]
    losses = [(key, name) for key, name in losses if any(key in entry for entry in loss_history)]
    panels = len(losses) + 1
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), squeeze=False)
    for ax, (key, name) in zip(axes[0], losses):
        points = [(e["step"], e[key]) for e in loss_history if key in e]
        ax.plot(*zip(*points), linewidth=1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (mean over the log interval)")
        ax.grid(alpha=0.3)
    ax = axes[0][-1]
    for key, name in (("test/source_acc", "source test"), ("val/target_acc", "target validation"), ("test/target_acc", "target test")):
        points = [(e["step"], e[key]) for e in eval_history if e.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, linewidth=1, label=name)
    ax.set_title("accuracy of T", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def nearest_neighbours(queries: torch.Tensor, pool: torch.Tensor, k: int, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (distances, indices) of the k images in pool closest to each query, by L2 in pixel space.

    queries: Q x 3 x H x W floats; pool: N x 3 x H x W floats or uint8 (scaled like the model input).
    The pool is scanned in chunks with torch.cdist, so memory stays bounded for large pools.
    """
    from pixelda.data import to_model_input

    flat_queries = queries.float().flatten(1)
    best_d = torch.full((queries.shape[0], 0), float("inf"))
    best_i = torch.zeros((queries.shape[0], 0), dtype=torch.long)
    for start in range(0, pool.shape[0], chunk):
        block = pool[start:start + chunk]
        block = to_model_input(block) if block.dtype == torch.uint8 else block.float()
        d = torch.cdist(flat_queries, block.flatten(1).to(flat_queries.device))  # Q x chunk
        d = torch.cat([best_d, d.cpu()], dim=1)
        i = torch.cat([best_i, torch.arange(start, start + block.shape[0]).expand(queries.shape[0], -1)], dim=1)
        best_d, order = d.topk(min(k, d.shape[1]), dim=1, largest=False)
        best_i = i.gather(1, order)
    return best_d, best_i


def save_nearest_neighbours(translated: torch.Tensor, pool: torch.Tensor, path: Path, title: str, k: int = 5) -> Path:
    """For each translated image, show its k nearest real target-train images with their L2 distances."""
    distances, indices = nearest_neighbours(translated, pool, k)
    rows = translated.shape[0]
    fig, axes = plt.subplots(rows, k + 1, figsize=(1.3 * (k + 1), 1.35 * rows + 0.6), squeeze=False)
    from pixelda.data import to_model_input

    for r in range(rows):
        _image_axes(axes[r][0], to_display(translated[r:r + 1])[0], "G(x_s, z)" if r == 0 else None)
        neighbours = pool[indices[r]]
        neighbours = to_model_input(neighbours) if neighbours.dtype == torch.uint8 else neighbours
        pictures = to_display(neighbours)
        for c in range(k):
            _image_axes(axes[r][c + 1], pictures[c], f"d={distances[r, c]:.1f}")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def save_misclassified(images: torch.Tensor, predicted: torch.Tensor, true: torch.Tensor, path: Path,
                       title: str, limit: int = 24, columns: int = 8) -> Path:
    """Show up to `limit` misclassified images, each titled with its predicted and true label."""
    wrong = torch.nonzero(predicted != true).flatten()[:limit]
    count = max(1, len(wrong))
    rows = (count + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(1.3 * columns, 1.45 * rows + 0.6), squeeze=False)
    pictures = to_display(images[wrong]) if len(wrong) else []
    for n, ax in enumerate(axes.flatten()):
        if n < len(wrong):
            i = wrong[n]
            _image_axes(ax, pictures[n], f"pred {int(predicted[i])} / true {int(true[i])}")
        else:
            ax.axis("off")
    if not len(wrong):
        axes[0][0].text(0.5, 0.5, "no misclassified image", ha="center", va="center")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def save_confusion_matrix(predicted: torch.Tensor, true: torch.Tensor, path: Path, title: str, classes: int = 10) -> Path:
    """Plot the confusion matrix (rows: true label, columns: predicted label) with counts in the cells."""
    matrix = torch.zeros(classes, classes, dtype=torch.long)
    matrix.index_put_((true.long().cpu(), predicted.long().cpu()), torch.ones(len(true), dtype=torch.long), accumulate=True)
    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    image = ax.imshow(matrix.numpy(), cmap="Blues")
    fig.colorbar(image, ax=ax, label="images")
    ax.set_xticks(range(classes))
    ax.set_yticks(range(classes))
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    threshold = matrix.max().item() / 2
    for t in range(classes):
        for p in range(classes):
            value = matrix[t, p].item()
            if value:
                ax.text(p, t, str(value), ha="center", va="center", fontsize=7, color="white" if value > threshold else "black")
    accuracy = 100.0 * matrix.diag().sum().item() / max(1, matrix.sum().item())
    ax.set_title(f"{title}\naccuracy {accuracy:.2f}% on {matrix.sum().item()} images", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
