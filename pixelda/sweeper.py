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
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import optuna
from hydra.core.config_store import ConfigStore
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf, TPESamplerConfig
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import DictConfig

log = logging.getLogger("pixelda.sweeper")

PARENT_TAG = "pixelda.sweep_parent"
STUDY_TAG = "optuna.study_name"
STORAGE_TAG = "optuna.storage"


@dataclass
class PixelDASweeperConf(OptunaSweeperConf):
    _target_: str = "pixelda.sweeper.PixelDASweeper"


@dataclass
class PixelDATPESamplerConf(TPESamplerConfig):
    """TPE seeded per trial number (TrialSeededTPESampler) with defaults for shared studies."""

    _target_: str = "pixelda.sweeper.TrialSeededTPESampler"
    seed: Optional[int] = 0
    n_startup_trials: int = 5
    # workers that share the study see each other's running trials, so they spread out
    constant_liar: bool = True


def register_sweeper_config() -> None:
    store = ConfigStore.instance()
    store.store(group="hydra/sweeper", name="pixelda_optuna", node=PixelDASweeperConf, provider="pixelda")
    store.store(group="hydra/sweeper/sampler", name="pixelda_tpe", node=PixelDATPESamplerConf, provider="pixelda")


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


def open_shared_storage(url: str, attempts: int = 5) -> optuna.storages.RDBStorage:
    """Open a database storage that other machines may be creating at the same moment.

    Two workers that find an empty database both create Optuna's tables, and one of them fails
    (PostgreSQL: UniqueViolation). By the retry the tables exist, so it succeeds.
    """
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url)
        except SQLAlchemyError as err:
            if attempt == attempts - 1:
                raise
            log.warning("opening Optuna storage failed (%s); retry %d", type(err).__name__, attempt + 1)
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


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
        from pixelda.tracking import file_lock, get_client, get_or_create_experiment

        ensure_sqlite_folder(self.storage)
        self.storage_url = str(self.storage)
        if self.storage_url.startswith("sqlite:///"):
            # Several workers write to one SQLite file: they wait for its write lock instead of failing
            # after SQLite's 5 s, and the first one alone creates the tables.
            with file_lock(Path(self.storage_url[len("sqlite:///"):]).expanduser()):
                self.storage = optuna.storages.RDBStorage(self.storage_url, engine_kwargs={"connect_args": {"timeout": 120}})
        elif "://" in self.storage_url:
            self.storage = open_shared_storage(self.storage_url)
        if self.study_name is None:
            raise ValueError("hydra.sweeper.study_name is not set; name the study so that workers and resumed sweeps share it")
        tracking = self.config.tracking
        client = get_client(tracking.uri)
        experiment_id = get_or_create_experiment(client, tracking.experiment)
        search_space = dict(self.params or {})
        self.parent_run_id = open_parent_run(client, experiment_id, self.study_name, self.storage_url, search_space)
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


class TrialSeededTPESampler(optuna.samplers.TPESampler):
    """TPE whose random draws for trial n depend only on (seed, n).

    Workers that share a study draw trials with different numbers, so their seeded samplers do not
    propose the same params, and a single worker stays reproducible. It reseeds TPESampler's
    private generators (_rng, _random_sampler._rng, as in Optuna 4.x-5.x); without them it falls
    back to plain TPE.
    """

    def __init__(self, *args, seed: Optional[int] = None, **kwargs):
        super().__init__(*args, seed=seed, **kwargs)
        self._base_seed = seed

    def before_trial(self, study: optuna.Study, trial) -> None:
        if self._base_seed is not None and hasattr(self, "_rng") and hasattr(self, "_random_sampler"):
            seed = (self._base_seed * 1_000_003 + trial.number) % 2**32
            self._rng.rng.seed(seed)
            self._random_sampler._rng.rng.seed((seed + 1) % 2**32)
        super().before_trial(study, trial)


class PixelDASweeper(OptunaSweeper):
    """The Optuna sweeper plugin with pixelda's MLflow integration (PixelDASweeperImpl)."""

    def __init__(self, sampler, direction, storage, study_name, n_trials, n_jobs, max_failure_rate,
                 custom_search_space, params) -> None:
        # the same samplers as the optuna sweeper allows, plus TrialSeededTPESampler
        sampler = instantiate(sampler, _execution_whitelist_=(
            "hydra_plugins.hydra_optuna_sweeper.*", "optuna.samplers.*", "pixelda.sweeper.*"))
        self.sweeper = PixelDASweeperImpl(sampler, direction, storage, study_name, n_trials, n_jobs,
                                          max_failure_rate, custom_search_space, params)
