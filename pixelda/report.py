"""Write a Markdown report of an MLflow experiment: a paper-style table by mode, and the figures.

    python -m pixelda.report experiment=baselines output=reports/baselines.md

The table has one row per mode (source only, PixelDA, target only) with the mean +- std over the
runs that differ only in their seed, and the number of runs. Configurations that differ in other
params get rows of their own, named by those params. Each row's numbers are taken at its runs'
best target-validation evaluation (the model in best.pt). The figures of each mode's best run are
copied next to the report and linked from it.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pixelda.errors import UserError, report_user_errors
from pixelda.summary import OBJECTIVE, Row, fetch_runs, group_runs, mean_std, SummaryConfig

MODE_NAMES = {"source_only": "source only", "pixelda": "PixelDA", "target_only": "target only (uses target labels)"}
MODE_ORDER = ["source_only", "pixelda", "target_only"]


@dataclass
class ReportConfig:
    experiment: str = "pixelda"
    """MLflow experiment to report on."""
    uri: str = "sqlite:///mlruns/mlflow.db"
    """MLflow tracking URI."""
    output: Optional[str] = None
    """Markdown file to write; null writes reports/<experiment>.md."""
    parent: Optional[str] = None
    """Only the child runs of this parent run."""


def domain_gaps(row: Row) -> list[float]:
    """Source-test minus target accuracy per run, with target test where present, else validation."""
    targets = row.values["test"] if len(row.values["test"]) == len(row.values["source"]) else row.values["val"]
    return [s - t for s, t in zip(row.values["source"], targets)]


def table(rows: list[Row], keys: list[str]) -> list[str]:
    """Format the paper-style Markdown table, one line per configuration."""
    extra = [k for k in keys if k != "mode"]
    header = ["mode", *extra, "runs", "target validation % (best)", "target test % (at best)",
              "source test % (at best)", "domain gap % (source - target)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        mode = row.params.get("mode", "pixelda")
        cells = [MODE_NAMES.get(mode, mode), *[row.params[k] for k in extra], str(len(row.run_names)),
                 mean_std(row.values["val"]), mean_std(row.values["test"]), mean_std(row.values["source"]),
                 mean_std(domain_gaps(row))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def copy_figures(client, run, destination: Path) -> list[Path]:
    """Download the run's figures and its last translation grid; return the local files."""
    destination.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    files = []
    for folder in ("figures", "images"):
        names = sorted(a.path for a in client.list_artifacts(run.info.run_id, folder))
        if folder == "images":
            names = names[-1:]  # the grid of the last evaluation
        for name in names:
            files.append(Path(client.download_artifacts(run.info.run_id, name, str(destination))))
    return files


def build_report(cfg: ReportConfig) -> tuple[str, Path]:
    """Return the Markdown text and the path it belongs at (figures are copied beside it)."""
    from pixelda.tracking import get_client

    runs = fetch_runs(SummaryConfig(experiment=cfg.experiment, uri=cfg.uri, parent=cfg.parent))
    if not runs:
        raise UserError(f"experiment {cfg.experiment} has no run with {OBJECTIVE}; train some runs first")
    for run in runs:  # mode is a param of every run; older runs may lack it
        run.data.params.setdefault("mode", run.data.tags.get("pixelda.mode", "pixelda"))
    rows, keys = group_runs(runs, [])
    if "mode" not in keys:
        keys = ["mode", *keys]
        rows, keys = group_runs(runs, keys)
    rows.sort(key=lambda r: (MODE_ORDER.index(r.params["mode"]) if r.params["mode"] in MODE_ORDER else 99, -r.objective))

    output = (Path(cfg.output) if cfg.output else Path("reports") / f"{cfg.experiment}.md").resolve()
    figure_root = output.parent / f"{output.stem}_figures"
    client = get_client(cfg.uri)
    lines = [f"# pixelda report: {cfg.experiment}", "",
             f"{len(runs)} runs from {client.tracking_uri}, written {time.strftime('%Y-%m-%d %H:%M')}. "
             "Each value is the mean +- std over the runs of a configuration (they differ only in their seed), "
             "taken at each run's best target-validation evaluation. The target test split is for reporting only; "
             "model selection used target validation.", ""]
    lines += table(rows, keys)
    lines += ["", "## Figures of each mode's best run", ""]
    for mode in MODE_ORDER:
        candidates = [r for r in runs if r.data.params.get("mode") == mode]
        if not candidates:
            continue
        best = max(candidates, key=lambda r: r.data.metrics[OBJECTIVE])
        files = copy_figures(client, best, figure_root / best.info.run_id)
        lines += [f"### {MODE_NAMES[mode]}: run `{best.info.run_name}` ({best.info.run_id}), "
                  f"target validation {best.data.metrics[OBJECTIVE]:.2f}%", ""]
        for file in files:
            lines.append(f"![{file.stem}]({file.relative_to(output.parent).as_posix()})")
        lines.append("")
    return "\n".join(lines) + "\n", output


def parse_args(argv: list[str]) -> ReportConfig:
    schema = OmegaConf.structured(ReportConfig)
    try:
        return OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.from_dotlist(argv)))
    except OmegaConfBaseException as err:
        raise UserError(f"invalid argument ({str(err).splitlines()[0]}); use key=value with keys {', '.join(schema.keys())}") from None


def main() -> None:
    with report_user_errors():
        text, output = build_report(parse_args(sys.argv[1:]))
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
        print(f"wrote {output}")


if __name__ == "__main__":
    main()
