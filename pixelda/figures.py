"""PNG figures that runs log to MLflow."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display is needed, and none exists on servers
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def to_display(images: torch.Tensor) -> torch.Tensor:
    """Map a batch in [-1, 1] (N x 3 x H x W) to floats in [0, 1], N x H x W x 3, for imshow."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)


def save_translation_grid(source: torch.Tensor, translated: torch.Tensor, target: torch.Tensor,
                          path: Path, title: str) -> Path:
    """Save three labelled rows, source | G(source, z) | real target images, as one PNG."""
    rows = [("source x_s", source), ("translated G(x_s, z)", translated), ("real target x_t", target)]
    columns = source.shape[0]
    fig, axes = plt.subplots(3, columns, figsize=(1.1 * columns, 3.7), squeeze=False)
    for r, (label, images) in enumerate(rows):
        pictures = to_display(images)
        for c in range(columns):
            ax = axes[r][c]
            ax.imshow(pictures[c].numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
