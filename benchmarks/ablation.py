"""Run the accuracy ablation at a fixed wall-time budget and print its Markdown table.

    python benchmarks/ablation.py --data-root ../shared/data --minutes 10 --seeds 0 1
    python benchmarks/ablation.py --table-only          # the table from the runs already logged

Every row is `python -m pixelda.train` on the small MNIST -> MNIST-M protocol with the row's
overrides, stopped by train.max_minutes, once per seed. The seeds of a row run side by side with
one CPU thread each, so on a 2-core machine each run has one core for the budget. Runs are logged to the
MLflow experiment `ablation` with the row name as run name. A row and seed that already have a
finished run are not run again, so an interrupted ablation resumes. The table gives each row's best
target-validation accuracy (mean +- std over seeds), its step count, its wall time and whether the
recipe uses it.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXPERIMENT = "ablation"
# G and D with 32 filters instead of 64: the base that every lever below is added to, alone.
FAST = ["model.generator.filters=32", "model.discriminator.filters=32"]
WIDE_T = ["model.classifier.conv1=64", "model.classifier.conv2=128", "model.classifier.hidden=256"]
# Steps per minute of the base with one core (it made 3,142-3,146 steps in 15 minutes, about 210 per minute).
# "{budget_steps}" in a row becomes minutes x this rate, so a step schedule ends inside the budget.
# The rate is below the measured one to leave a margin for a slower run.
STEPS_PER_MINUTE = 200

# name -> (overrides, group, in the recipe)
ROWS: dict[str, tuple[list[str], str, bool]] = {
    "reference (notebook settings)": ([], "reference", False),
    "source only (reference T)": (["mode=source_only"], "reference", False),
    "G and D with 32 filters (base)": (FAST, "architecture", True),
    "+ content loss (PMSE, 0.05)": (FAST + ["loss.content_weight=0.05"], "paper", False),
    # The horizon is the budget. With train.epochs=1000 alone, cosine would stay above 0.99 for 15 minutes.
    "+ cosine learning-rate decay (to 0 at the budget)": (FAST + ["train.lr_schedule=cosine", "train.max_steps={budget_steps}"],
                                                          "paper", False),
    "+ 10-d noise": (FAST + ["model.generator.noise_dim=10"], "paper", False),
    "+ D with BatchNorm": (FAST + ["model.discriminator.batchnorm=true"], "paper", False),
    "+ private first layer of T": (FAST + ["model.classifier.private_first_layer=true"], "paper", False),
    "+ gradient clipping (5)": (FAST + ["train.grad_clip=5"], "paper", False),
    "+ label smoothing (0.1)": (FAST + ["loss.label_smoothing=0.1"], "GAN", False),
    "+ 2 D updates per step": (FAST + ["train.d_updates=2"], "GAN", False),
    "+ instance noise (0.1)": (FAST + ["loss.instance_noise=0.1"], "GAN", False),
    "+ least-squares GAN loss": (FAST + ["loss.gan=lsgan"], "GAN", False),
    "+ hinge GAN loss": (FAST + ["loss.gan=hinge"], "GAN", False),
    "+ D learning rate 2e-4": (FAST + ["net_optimizer.D.lr=0.0002"], "optimisation", False),
    "+ G and D Adam betas (0, 0.9)": (FAST + ["net_optimizer.G.betas=[0.0,0.9]", "net_optimizer.D.betas=[0.0,0.9]"],
                                      "optimisation", False),
    "+ batch size 64": (FAST + ["train.batch_size=64"], "optimisation", False),
    "+ 2 T updates per step": (FAST + ["train.t_updates=2"], "optimisation", False),
    "+ EMA of G and T (0.999)": (FAST + ["train.ema_decay=0.999"], "optimisation", False),
    "+ wide T (64-128-256)": (FAST + WIDE_T, "architecture", False),
    "+ T with BatchNorm": (FAST + ["model.classifier.batchnorm=true"], "architecture", False),
    "+ G with 3 blocks": (FAST + ["model.generator.blocks=3"], "architecture", False),
    "+ shifted source images (2 px)": (FAST + ["train.augment_shift=2"], "augmentation", False),
    # The best trial of the 8-trial loss-weight sweep in docs/sweeps.md (4 epochs per trial, target validation).
    "+ swept loss weights (alpha 1.228, beta 0.00319, g_loss_weight 0.0994)":
        (FAST + ["loss.alpha=1.228", "loss.beta=0.00319", "loss.g_loss_weight=0.0994"], "loss weights", False),
    # In the recommended recipe, which starts it at step 3,000 of its 55 minutes. A 15-minute run on one core
    # makes about 3,000 steps, so this row starts it at step 1,000.
    "+ self-training (beyond PixelDA)": (FAST + ["loss.self_training_weight=1", "loss.self_training_threshold=0.95",
                                                "loss.self_training_start=1000"], "beyond PixelDA", True),
}


def finished_runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    return [r for r in client.search_runs([experiment.experiment_id], max_results=10000) if r.info.status == "FINISHED"]


def hydra_quoted(value: str) -> str:
    """Quote a string for a Hydra override, so that spaces, brackets and commas stay part of the value."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def row_overrides(name: str, overrides: list[str], seed: int, data_root: str, minutes: float, uri: str,
                  output_dir: str = "outputs/ablation") -> list[str]:
    """Return the Hydra overrides of one row and seed for `python -m pixelda.train`."""
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    # the classifier alone converges in seconds, so source only stops after 10 epochs
    epochs = 10 if "mode=source_only" in overrides else 1000
    overrides = [o.replace("{budget_steps}", str(int(minutes * STEPS_PER_MINUTE))) for o in overrides]
    return ["data=mnist_mnistm_small", f"data.root={data_root}", f"train.epochs={epochs}", f"train.max_minutes={minutes}",
            "train.progress=false", f"seed={seed}", f"tracking.uri={uri}", f"tracking.experiment={EXPERIMENT}",
            f"tracking.run_name={hydra_quoted(name)}", f"hydra.run.dir={output_dir}/{slug}-s{seed}", *overrides]


def run_row(name: str, overrides: list[str], seeds: list[int], args) -> int:
    """Run one row's seeds side by side, one CPU thread each, wait for all of them and return how many failed."""
    processes = []
    for seed in seeds:
        command = [sys.executable, "-m", "pixelda.train",
                   *row_overrides(name, overrides, seed, args.data_root, args.minutes, args.uri, args.output_dir)]
        print(f"running {name!r} seed {seed}", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        processes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL))
    failures = 0
    for process in processes:
        if process.wait() != 0:
            failures += 1
            print(f"{name!r} failed with exit status {process.returncode}; its error is printed above", flush=True)
    return failures


def last_step(client, run) -> int:
    """Return the last step at which a run logged T's loss or the target-validation accuracy."""
    steps = [m.step for key in ("train/loss_t", "val/target_acc") for m in client.get_metric_history(run.info.run_id, key)]
    return max(steps, default=0)


def table(uri: str, minutes: float) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = finished_runs(uri)
    lines = ["| lever | group | runs | target validation % (best, mean +- std) | steps (mean) | wall time (min, mean) "
             "| in the recipe |",
             "|---|---|---|---|---|---|---|"]
    for name, (overrides, group, in_recipe) in ROWS.items():
        mine = [r for r in runs if r.info.run_name == name]
        values = [r.data.metrics["val/best_target_acc"] for r in mine if "val/best_target_acc" in r.data.metrics]
        minutes_taken = [(r.info.end_time - r.info.start_time) / 60000 for r in mine if r.info.end_time]
        if values:
            spread = f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"
            steps = f"{statistics.mean(last_step(client, r) for r in mine):,.0f}"
            wall = f"{statistics.mean(minutes_taken):.1f}"
        else:
            spread, steps, wall = "not run", "-", "-"
        lines.append(f"| {name} | {group} | {len(values)} | {spread} | {steps} | {wall} | {'yes' if in_recipe else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-time budget of each run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--uri", default=f"sqlite:///{REPO}/mlruns/mlflow.db")
    parser.add_argument("--only", nargs="*", help="run only the rows whose names contain one of these strings")
    parser.add_argument("--output-dir", default="outputs/ablation", help="folder of the runs' Hydra outputs and checkpoints")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each run (the seeds run side by side)")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()

    failures = 0
    if not args.table_only:
        for name, (overrides, _, _) in ROWS.items():
            if args.only and not any(part in name for part in args.only):
                continue
            runs = finished_runs(args.uri)
            missing = [s for s in args.seeds if not any(r.info.run_name == name and r.data.params.get("seed") == str(s) for r in runs)]
            if missing:
                failures += run_row(name, overrides, missing, args)
    print(table(args.uri, args.minutes))
    if failures:
        sys.exit(f"error: {failures} training run(s) failed; fix the error printed for each, then rerun to run only the missing rows")


if __name__ == "__main__":
    main()
