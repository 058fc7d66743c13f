"""Hydra's Optuna sweeper with MLflow parent runs, selected by `hydra/sweeper: pixelda_optuna`.

It behaves as hydra-optuna-sweeper's `optuna` sweeper (same keys: n_trials, n_jobs, storage,
study_name, sampler, params) and adds:
- one MLflow parent run per study, shared by every worker of the study and by resumed sweeps;
- three overrides per trial, so that each training run is a child run tagged with the Optuna trial
  number and study name;
- after the trials, the best params and value and Optuna's optimization-history and
  parameter-importance plots, logged to the parent run;
- a clean end when no trial completed, and trials cut short by Ctrl-C marked FAIL in the study.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import optuna
from hydra.core.config_store import ConfigStore
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import DictConfig

log = logging.getLogger("pixelda.sweeper")

PARENT_TAG = "pixelda.sweep_parent"
STUDY_TAG = "optuna.study_name"
STORAGE_TAG = "optuna.storage"


@dataclass
class PixelDASweeperConf(OptunaSweeperConf):
    _target_: str = "pixelda.sweeper.PixelDASweeper"


def register_sweeper_config() -> None:
    ConfigStore.instance().store(group="hydra/sweeper", name="pixelda_optuna", node=PixelDASweeperConf, provider="pixelda")


register_sweeper_config()


def ensure_sqlite_folder(storage: Any) -> None:
    """Create the folder of a relative or absolute sqlite:/// Optuna storage, which SQLite will not do."""
    if isinstance(storage, str) and storage.startswith("sqlite:///"):
        Path(storage[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)


def open_parent_run(client, experiment_id: str, study_name: str, storage: str, search_space: dict) -> str:
    """Return the id of the study's parent run, creating it if no worker has.

    Workers started at the same moment may each create one. All of them then keep the oldest
    (by start time, then id) and delete the others, so every worker ends up with the same parent.
    """
    from pixelda.tracking import retry_locked

    query = f"tags.`{PARENT_TAG}` = 'true' and tags.`{STUDY_TAG}` = '{study_name}'"

    def candidates():
        runs = retry_locked(lambda: client.search_runs([experiment_id], filter_string=query, max_results=1000), "parent lookup")
        return sorted((r for r in runs if r.data.tags.get(STORAGE_TAG) == storage), key=lambda r: (r.info.start_time, r.info.run_id))

    existing = candidates()
    if existing:
        return existing[0].info.run_id
    tags = {PARENT_TAG: "true", STUDY_TAG: study_name, STORAGE_TAG: storage}
    mine = retry_locked(lambda: client.create_run(experiment_id, run_name=f"sweep {study_name}", tags=tags), "parent creation").info.run_id
    elected = candidates()[0].info.run_id
    if elected != mine:
        client.delete_run(mine)
        return elected
    from pixelda.tracking import RunLogger

    RunLogger(client, mine).log_params({f"search_space.{k}": str(v) for k, v in search_space.items()})
    return mine


class PixelDASweeperImpl(OptunaSweeperImpl):
    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.parent_run_id: Optional[str] = None
        self.in_flight: list[optuna.trial.Trial] = []

    def _configure_trials(self, trials, search_space_distributions, fixed_params, fixed_overrides):
        overrides = super()._configure_trials(trials, search_space_distributions, fixed_params, fixed_overrides)
        self.in_flight = list(trials)
        extra = [f"tracking.study_name={self.study_name}"]
        if self.parent_run_id:
            extra.append(f"tracking.parent_run_id={self.parent_run_id}")
        return [tuple(o) + tuple(extra) + (f"tracking.trial_number={t.number}",) for o, t in zip(overrides, trials)]

    def sweep(self, arguments: list[str]) -> None:
        from pixelda.tracking import get_client, get_or_create_experiment

        ensure_sqlite_folder(self.storage)
        if self.study_name is None:
            raise ValueError("hydra.sweeper.study_name is not set; name the study so that workers and resumed sweeps share it")
        tracking = self.config.tracking
        client = get_client(tracking.uri)
        experiment_id = get_or_create_experiment(client, tracking.experiment)
        search_space = dict(self.params or {})
        self.parent_run_id = open_parent_run(client, experiment_id, self.study_name, str(self.storage), search_space)
        log.info("MLflow parent run %s in experiment %s", self.parent_run_id, tracking.experiment)

        try:
            super().sweep(arguments)
        except (KeyboardInterrupt, SystemExit):
            self._fail_in_flight("interrupted")
            raise
        except ValueError as err:
            if "No trials are completed yet" not in str(err):
                raise
            log.error("no trial of study %s has completed; see the failed trials' logs above", self.study_name)
        finally:
            self._log_outcome(client)

    def _fail_in_flight(self, reason: str) -> None:
        """Mark trials of the interrupted batch FAIL, so that they do not stay RUNNING in the study."""
        study = optuna.load_study(study_name=self.study_name, storage=self.storage)
        for trial in self.in_flight:
            if study.get_trials(deepcopy=False)[trial.number].state == optuna.trial.TrialState.RUNNING:
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
                log.warning("trial %d marked FAIL: %s", trial.number, reason)

    def _log_outcome(self, client) -> None:
        """Log the best trial and Optuna's plots to the parent run."""
        from pixelda.tracking import RunLogger

        study = optuna.load_study(study_name=self.study_name, storage=self.storage)
        logger = RunLogger(client, self.parent_run_id)
        states = [t.state for t in study.get_trials(deepcopy=False)]
        counts = {state.name.lower(): states.count(state) for state in optuna.trial.TrialState}
        logger.log_metrics({f"trials/{name}": count for name, count in counts.items()}, step=len(states))
        complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
        if complete:
            best = study.best_trial
            logger.log_metrics({"best/value": best.value, **{f"best/{k}": v for k, v in best.params.items()}}, step=len(states))
            logger.set_tags({"best.trial_number": best.number, "best.params": str(best.params)})
            log.info("best trial %d: %.4f with %s", best.number, best.value, best.params)
            self._log_plots(study, logger, len(complete))
        logger.end("FINISHED")

    @staticmethod
    def _log_plots(study: optuna.Study, logger, completed: int) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as optuna_plots

        plots = {"optimization_history.png": optuna_plots.plot_optimization_history}
        if completed >= 2:
            plots["param_importances.png"] = optuna_plots.plot_param_importances
        with tempfile.TemporaryDirectory() as folder:
            for name, plot in plots.items():
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # Optuna flags its matplotlib plots as experimental
                        axes = plot(study)
                except (ValueError, RuntimeError) as err:  # e.g. every completed trial has the same params
                    log.warning("cannot draw %s: %s", name, err)
                    continue
                figure = axes.get_figure() if hasattr(axes, "get_figure") else axes
                figure.set_size_inches(8, 5)
                figure.tight_layout()
                figure.savefig(Path(folder) / name, dpi=80)
                plt.close(figure)
                logger.log_artifact(Path(folder) / name, "optuna")


class PixelDASweeper(OptunaSweeper):
    """The Optuna sweeper plugin with pixelda's MLflow integration (PixelDASweeperImpl)."""

    def __init__(self, sampler, direction, storage, study_name, n_trials, n_jobs, max_failure_rate,
                 custom_search_space, params) -> None:
        super().__init__(sampler, direction, storage, study_name, n_trials, n_jobs, max_failure_rate, custom_search_space, params)
        inner = self.sweeper
        self.sweeper = PixelDASweeperImpl(inner.sampler, direction, storage, study_name, n_trials, n_jobs,
                                          max_failure_rate, custom_search_space, params)
