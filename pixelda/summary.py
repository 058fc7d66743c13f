"""Print the runs of an MLflow experiment or sweep as a table, best first.

    python -m pixelda.summary experiment=sweep_loss_weights
    python -m pixelda.summary experiment=pixelda parent=RUN_ID format=markdown

Runs that differ only in their seed (e.g. from `python -m pixelda.train --multirun seed=0,1,2`)
form one configuration, shown as mean +- std over its runs. The columns are the params that vary
between configurations, the number of runs, the best target-validation accuracy (the objective),
and the target-test and source-test accuracy at that best evaluation.
"""

from __future__ import annotations

import math
import statistics
import sys
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pixelda.errors import UserError, report_user_errors

# Params that do not define a configuration: where a run logs to, where it reads from, its seed.
IGNORED_PREFIXES = ("seed", "tracking.", "train.resume", "train.checkpoint_dir", "train.progress", "data.cache_dir",
                    "data.root", "device", "train.log_every", "train.eval_batch_size")
OBJECTIVE = "val/best_target_acc"
COLUMNS = {"val": OBJECTIVE, "test": "test/target_acc_at_best", "source": "test/source_acc_at_best"}


@dataclass
class SummaryConfig:
    experiment: str = "pixelda"
    """MLflow experiment to summarize."""
    parent: Optional[str] = None
    """Only the child runs of this parent run (a sweep)."""
    uri: str = "sqlite:///mlruns/mlflow.db"
    """MLflow tracking URI."""
    format: str = "table"
    """table (fixed-width text) or markdown."""
    group: list[str] = field(default_factory=list)
    """Params that define a configuration; empty means every param that varies, except the seed."""


@dataclass
class Row:
    """One configuration: its params and the metric values of its runs."""

    params: dict[str, str]
    values: dict[str, list[float]]
    run_names: list[str]
    statuses: list[str]

    @property
    def objective(self) -> float:
        return statistics.mean(self.values["val"]) if self.values["val"] else -math.inf


def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


def fetch_runs(cfg: SummaryConfig) -> list:
    """Return the experiment's finished or stopped runs (not sweep parents), optionally one sweep's children."""
    from pixelda.tracking import get_client

    client = get_client(cfg.uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        names = [e.name for e in client.search_experiments()]
        raise UserError(f"no MLflow experiment named '{cfg.experiment}' in {client.tracking_uri}; known experiments: {', '.join(names) or 'none'}")
    query = f"tags.`mlflow.parentRunId` = '{cfg.parent}'" if cfg.parent else ""
    runs = client.search_runs([experiment.experiment_id], filter_string=query, max_results=50000)
    return [r for r in runs if r.data.tags.get("pixelda.sweep_parent") != "true" and OBJECTIVE in r.data.metrics]


def group_runs(runs: list, group: list[str]) -> tuple[list[Row], list[str]]:
    """Group runs into configurations and return the rows, best first, and the param columns."""
    def relevant(params: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in params.items() if not k.startswith(IGNORED_PREFIXES)}

    if group:
        keys = list(group)
    else:
        all_params = [relevant(r.data.params) for r in runs]
        names = sorted({k for p in all_params for k in p})
        keys = [k for k in names if len({p.get(k) for p in all_params}) > 1]
    rows: dict[tuple, Row] = {}
    for run in runs:
        params = {k: run.data.params.get(k, "") for k in keys}
        row = rows.setdefault(tuple(params.values()), Row(params, {c: [] for c in COLUMNS}, [], []))
        for column, metric in COLUMNS.items():
            if metric in run.data.metrics:
                row.values[column].append(run.data.metrics[metric])
        row.run_names.append(run.info.run_name)
        row.statuses.append(run.info.status)
    return sorted(rows.values(), key=lambda r: r.objective, reverse=True), keys


def short(name: str) -> str:
    """Column title for a param: its last two dotted parts."""
    return ".".join(name.split(".")[-2:])


def render(rows: list[Row], keys: list[str], fmt: str) -> str:
    # the objective first, so that a table with many varying params still reads from the left
    header = ["rank", "val best %", "test at best %", "source at best %", "runs", *[short(k) for k in keys]]
    body = []
    for rank, row in enumerate(rows, start=1):
        body.append([str(rank), mean_std(row.values["val"]), mean_std(row.values["test"]), mean_std(row.values["source"]),
                     str(len(row.run_names)), *[_compact(row.params[k]) for k in keys]])
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(cells[i]) for cells in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in body]
    return "\n".join(lines)


def _compact(value: str) -> str:
    """Shorten long floats such as 0.15984892439523418 to 4 significant digits."""
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.4g}" if "." in value or "e" in value else value


def parse_args(argv: list[str]) -> SummaryConfig:
    """Merge key=value arguments onto SummaryConfig, rejecting unknown keys and bad values."""
    schema = OmegaConf.structured(SummaryConfig)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.from_dotlist(argv))
    except OmegaConfBaseException as err:
        message = str(err).splitlines()[0]
        raise UserError(f"invalid argument ({message}); use key=value with keys {', '.join(schema.keys())}") from None
    cfg = OmegaConf.to_object(merged)
    if cfg.format not in ("table", "markdown"):
        raise UserError(f"unknown format '{cfg.format}'; use table or markdown")
    return cfg


def summarize(cfg: SummaryConfig) -> str:
    runs = fetch_runs(cfg)
    if not runs:
        scope = f"sweep {cfg.parent}" if cfg.parent else f"experiment {cfg.experiment}"
        return f"{scope}: no run has logged {OBJECTIVE} yet"
    rows, keys = group_runs(runs, cfg.group)
    title = (f"{cfg.experiment}: {len(runs)} runs in {len(rows)} configurations, sorted by {OBJECTIVE} "
             f"(mean +- std over seeds where a configuration has several runs)")
    return title + "\n" + render(rows, keys, cfg.format)


def main() -> None:
    with report_user_errors():
        print(summarize(parse_args(sys.argv[1:])))


if __name__ == "__main__":
    main()
