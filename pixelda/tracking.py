"""MLflow logging through an explicit MlflowClient and run id.

Using the client instead of mlflow's fluent API keeps no global "active run", so a sweep can hold
its parent run open in the same process while trials log child runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar
from urllib.parse import urlparse

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from pixelda.errors import UserError

log = logging.getLogger(__name__)

T = TypeVar("T")
# MLflow rejects batches above these sizes.
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_LENGTH = 6000
LOCKED_RETRIES = 8


def retry_locked(call: Callable[[], T], what: str) -> T:
    """Run call, retrying with backoff while SQLite reports that the database is locked."""
    for attempt in range(LOCKED_RETRIES):
        try:
            return call()
        except Exception as err:  # MLflow wraps SQLAlchemy's OperationalError in MlflowException
            if "database is locked" not in str(err) or attempt == LOCKED_RETRIES - 1:
                raise
            delay = 0.1 * 2 ** attempt
            log.warning("MLflow database is locked during %s; retry %d in %.1f s", what, attempt + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative SQLite URI absolute (against the launch folder) and create its folder."""
    if not uri.startswith("sqlite:///"):
        return uri
    db_path = Path(os.path.expanduser(uri[len("sqlite:///"):]))
    if not db_path.is_absolute():
        from hydra.utils import to_absolute_path

        db_path = Path(to_absolute_path(str(db_path)))
    db_path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db_path}"


def artifact_root_for(uri: str) -> Optional[str]:
    """Artifact folder for new experiments: beside the SQLite file, or the server's default."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).parent)
    return None


def get_client(uri: str) -> MlflowClient:
    """Return a client for the tracking URI, creating a SQLite store's tables first if needed.

    Workers that start together would otherwise run MLflow's schema migrations on the same new
    SQLite file at once; an exclusive lock on <file>.lock lets one of them create the tables.
    """
    uri = resolve_tracking_uri(uri)
    scheme = urlparse(uri).scheme
    if scheme in ("", "file"):
        raise UserError(
            f"tracking.uri={uri} is a plain file store, which MLflow 3.13 and later reject; "
            "use sqlite:///mlruns/mlflow.db or the URL of an MLflow server"
        )
    if scheme != "sqlite":
        return MlflowClient(tracking_uri=uri)
    with file_lock(Path(uri[len("sqlite:///"):])):  # the constructor creates or migrates the tables
        return retry_locked(lambda: MlflowClient(tracking_uri=uri), "store initialisation")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on <path>.lock, so that one process at a time creates a database's tables."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """Return the id of the named experiment, creating it (artifacts beside the SQLite file) if needed."""
    experiment = retry_locked(lambda: client.get_experiment_by_name(name), "experiment lookup")
    if experiment is not None:
        return experiment.experiment_id
    root = artifact_root_for(client.tracking_uri)
    location = None if root is None else str(Path(root) / name)
    try:
        return retry_locked(lambda: client.create_experiment(name, artifact_location=location), "experiment creation")
    except Exception:
        # Another worker may have created it between the lookup and the creation.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def flatten_config(cfg: DictConfig) -> dict[str, str]:
    """Flatten the resolved config into dotted keys, as MLflow params."""
    flat: dict[str, str] = {}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                visit(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = str(node)[:MAX_PARAM_LENGTH]

    visit("", OmegaConf.to_container(cfg, resolve=True))
    return flat


def git_commit() -> Optional[str]:
    """Return the commit of the pixelda checkout, or None outside a git work tree."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def run_name_from_overrides(overrides: Iterable[str]) -> str:
    """Build a run name from the command-line overrides that change the run's content."""
    ignored = ("tracking.", "train.resume", "hydra.", "train.progress")
    kept = [o for o in overrides if not o.lstrip("+~").startswith(ignored)]
    return ",".join(kept)[:250] or "defaults"


class RunLogger:
    """Logs params, metrics, tags and artifacts to one MLflow run."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id

    @classmethod
    def start(cls, cfg: DictConfig, overrides: list[str], resume_run_id: Optional[str] = None) -> tuple["RunLogger", bool]:
        """Reopen resume_run_id if this store has it, else create a run; return it and whether it is new."""
        client = get_client(cfg.tracking.uri)
        if resume_run_id:
            try:
                retry_locked(lambda: client.get_run(resume_run_id), "run lookup")
            except Exception:
                log.warning("MLflow run %s is not in %s; logging the resumed training to a new run", resume_run_id, client.tracking_uri)
            else:
                retry_locked(lambda: client.update_run(resume_run_id, status="RUNNING"), "run reopen")
                return cls(client, resume_run_id), False

        experiment_id = get_or_create_experiment(client, cfg.tracking.experiment)
        tags = {"pixelda.overrides": " ".join(overrides) or "(none)", "pixelda.mode": cfg.mode}
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        if cfg.tracking.parent_run_id:
            tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
        if cfg.tracking.study_name:
            tags["optuna.study_name"] = cfg.tracking.study_name
        if cfg.tracking.trial_number is not None:
            tags["optuna.trial_number"] = str(cfg.tracking.trial_number)
        if cfg.mode == "target_only":
            tags["pixelda.uses_target_labels"] = "true"
        name = cfg.tracking.run_name or run_name_from_overrides(overrides)
        run = retry_locked(lambda: client.create_run(experiment_id, run_name=name, tags=tags), "run creation")
        logger = cls(client, run.info.run_id)
        logger.log_params(flatten_config(cfg))
        return logger, True

    def log_params(self, params: dict[str, str]) -> None:
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            batch = items[i:i + MAX_PARAMS_PER_BATCH]
            retry_locked(lambda: self.client.log_batch(self.run_id, params=batch), "param logging")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            batch = items[i:i + MAX_METRICS_PER_BATCH]
            retry_locked(lambda: self.client.log_batch(self.run_id, metrics=batch), "metric logging")

    def set_tags(self, tags: dict[str, str]) -> None:
        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        retry_locked(lambda: self.client.log_batch(self.run_id, tags=batch), "tag logging")

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def end(self, status: str) -> None:
        """Close the run with FINISHED, FAILED or KILLED."""
        retry_locked(lambda: self.client.set_terminated(self.run_id, status=status), "run termination")
