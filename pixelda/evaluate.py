"""Score a trained T and print one JSON line: accuracy (percent), count (images scored), checkpoint.

    python -m pixelda.evaluate checkpoint=outputs/runs/.../checkpoints/best.pt   # split=auto
    python -m pixelda.evaluate checkpoint=PATH split=target_val
    python -m pixelda.evaluate checkpoint=PATH folder=/data/mnist_m

Without folder=, the split comes from the data preset stored in the checkpoint (data_root=DIR points
it at moved files). With folder=DIR, every image of DIR/mnist_m_test/ (or DIR/mnist_m_train/) is
scored. Logs go to stderr, so stdout holds only the JSON line.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from pixelda.checkpoint import load_checkpoint
from pixelda.data import SPLIT_NAMES, load_mnistm_layout, load_split
from pixelda.errors import UserError, report_user_errors
from pixelda.model import build_networks
from pixelda.runtime import count_correct, pick_device, resolve_precision

log = logging.getLogger("pixelda.evaluate")


def evaluate(cfg: DictConfig) -> dict:
    """Load the checkpoint's T, score it on the requested split or folder and return the result."""
    path = Path(os.path.expanduser(cfg.checkpoint)).resolve()
    state = load_checkpoint(path)
    run_cfg = OmegaConf.create(state["config"])
    device = pick_device(cfg.device)
    # by default the precision the run scored its evaluations in, so best.pt reproduces its logged accuracy
    precision = run_cfg.train.precision if cfg.precision == "checkpoint" else cfg.precision
    dtype = resolve_precision(precision, device)

    classifier = build_networks(run_cfg.model)["T"]
    # a run with train.ema_decay evaluated its weight average, so score that one too
    classifier.load_state_dict(state.get("averages", {}).get("T") or state["nets"]["T"])
    classifier.to(device)

    result: dict = {}
    if cfg.folder:
        folder = Path(hydra.utils.to_absolute_path(os.path.expanduser(cfg.folder))).resolve()
        if not folder.is_dir():
            raise UserError(f"folder not found: {folder}; pass folder=DIR holding mnist_m_test/ and mnist_m_test_labels.txt")
        split, part = load_mnistm_layout(folder, Path(os.path.expanduser(run_cfg.data.cache_dir)))
        result["folder"] = str(folder)
        result["part"] = part
    else:
        if cfg.split != "auto" and cfg.split not in SPLIT_NAMES:
            raise UserError(f"unknown split '{cfg.split}'; use auto or one of {', '.join(SPLIT_NAMES)}")
        if cfg.data_root:
            run_cfg.data.root = cfg.data_root
        name = "target_test" if cfg.split == "auto" else cfg.split
        split = load_split(run_cfg.data, name, root_option="data_root")
        if len(split) == 0 and cfg.split == "auto":
            log.warning("the target test split is empty under %s, so target validation is scored", run_cfg.data.root)
            name = "target_val"
            split = load_split(run_cfg.data, name, root_option="data_root")
        if len(split) == 0:
            raise UserError(
                f"split {name} of data={run_cfg.data.name} is empty under {run_cfg.data.root}; "
                "pass split=auto or split=target_val, or folder=DIR to score an MNIST-M folder"
            )
        result["split"] = name

    correct, count = count_correct(classifier, split, cfg.batch_size, device, dtype)
    log.info("%d of %d correct", correct, count)
    return {"accuracy": round(100.0 * correct / count, 4), "count": count, "checkpoint": str(path), **result}


@hydra.main(config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with report_user_errors():
        print(json.dumps(evaluate(cfg)), flush=True)


if __name__ == "__main__":
    main()
