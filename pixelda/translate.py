"""Translate digit images into the target style with a trained G and write them as PNG files.

    python -m pixelda.translate checkpoint=PATH input=my_digits/ output=translated/
    python -m pixelda.translate checkpoint=PATH input=source_test output=translated/ limit=100

A folder input takes every PNG and JPG in it, of any size, grey or colour. Each image is turned
grey and resized to 32 x 32, inverted when its border is bright (MNIST digits are light on a dark
background), and translated with seeded noise. A split input (source_train, source_test, ...) reads that
split of the checkpoint's data preset. Each output keeps its input's name; split outputs are named
<split>_<index>_label<y>.png. The last line of output gives the number of images written.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from pixelda.checkpoint import load_checkpoint
from pixelda.data import SPLIT_NAMES, load_split, to_model_input
from pixelda.errors import UserError, report_user_errors
from pixelda.figures import to_display
from pixelda.model import build_networks
from pixelda.runtime import autocast, pick_device, resolve_precision

log = logging.getLogger("pixelda.translate")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def load_folder(folder: Path, invert: str, limit) -> tuple[torch.Tensor, list[str]]:
    """Read a folder of digit images as uint8 N x 1 x 32 x 32 and return them with their output names."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise UserError(f"no PNG or JPG images in {folder}; pass input=DIR with digit images, or a split name ({', '.join(SPLIT_NAMES)})")
    images = []
    for file in files:
        try:
            with Image.open(file) as picture:
                grey = picture.convert("L").resize((32, 32), Image.BILINEAR)
        except OSError as err:
            raise UserError(f"cannot read image {file} ({err}); remove it or convert it to PNG") from None
        array = np.asarray(grey, dtype=np.uint8)
        border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
        if invert == "true" or (invert == "auto" and border.mean() > 127):
            array = 255 - array
        images.append(array)
    return torch.from_numpy(np.stack(images)).unsqueeze(1), [f"{f.stem}.png" for f in files]


def translate(cfg: DictConfig) -> int:
    """Write the translated images and return how many were written."""
    if str(cfg.invert) not in ("auto", "true", "false", "True", "False"):
        raise UserError(f"invert={cfg.invert} is invalid; use auto, true or false")
    state = load_checkpoint(cfg.checkpoint)
    weights = {**state["nets"], **state.get("averages", {})}
    if "G" not in weights:
        raise UserError(f"{cfg.checkpoint} has no generator (mode={state['config']['mode']}); pass a checkpoint of a mode=pixelda run")
    run_cfg = OmegaConf.create(state["config"])
    device = pick_device(cfg.device)
    dtype = resolve_precision(cfg.precision, device)

    source = str(cfg.input)
    if source in SPLIT_NAMES:
        if cfg.data_root:
            run_cfg.data.root = cfg.data_root
        split = load_split(run_cfg.data, source, root_option="data_root")
        count = len(split) if cfg.limit is None else min(cfg.limit, len(split))
        images = split.images[:count]
        names = [f"{source}_{i:05d}_label{int(split.labels[i])}.png" for i in range(count)]
    else:
        folder = Path(hydra.utils.to_absolute_path(os.path.expanduser(source)))
        if not folder.is_dir():
            raise UserError(f"input={source} is neither a folder nor a split; pass a folder of images or one of {', '.join(SPLIT_NAMES)}")
        images, names = load_folder(folder, str(cfg.invert).lower(), cfg.limit)

    G = build_networks(run_cfg.model)["G"]
    G.load_state_dict(weights["G"])
    G.to(device).eval()
    output = Path(hydra.utils.to_absolute_path(os.path.expanduser(str(cfg.output))))
    output.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(cfg.seed)
    written = 0
    for start in range(0, len(images), cfg.batch_size):
        batch = to_model_input(images[start:start + cfg.batch_size]).to(device)  # B x 3 x 32 x 32
        z = (torch.rand(batch.shape[0], G.noise_dim, generator=generator) * 2 - 1).to(device)
        with torch.inference_mode(), autocast(device, dtype):
            translated = G(batch, z)
        pictures = (to_display(translated) * 255).round().astype(np.uint8)
        for picture, name in zip(pictures, names[start:start + cfg.batch_size]):
            Image.fromarray(picture).save(output / name)
            written += 1
    log.info("translated %d images with G of %s (step %d)", written, cfg.checkpoint, state["step"])
    return written


@hydra.main(config_path="../conf", config_name="translate")
def main(cfg: DictConfig) -> None:
    with report_user_errors():
        written = translate(cfg)
        print(f"wrote {written} translated images to {Path(hydra.utils.to_absolute_path(str(cfg.output)))}", flush=True)


if __name__ == "__main__":
    main()
