"""Experiment tracking with MLflow: one run per training, resumable after a crash.

The only module that imports mlflow, and only inside functions, so importing it costs
nothing and ranks other than 0 never touch the store. The default store is a SQLite file
in the output folder (no server needed); ``MLFLOW_TRACKING_URI`` or ``uri`` points it
elsewhere, e.g. ``http://host:5000`` for a shared server.

A run records the resolved config (as flattened params ``model.channels`` and as the
artifact ``config.yaml``), caller params (data manifest hash, parameter count, world
size), the code version as tags, metrics in one batch call per step, and artifacts.
The trainer keeps ``run_id`` in its checkpoint and passes it back to ``start`` on resume.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os
import resource
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from common.config import ConfigError
from common.errors import UserError

STATUSES = ("FINISHED", "FAILED", "KILLED")


class TrackingError(UserError, RuntimeError):
    """A run that cannot be started or resumed as asked; the message says why."""


@dataclasses.dataclass
class TrackingConfig:
    """Where and under which names a training run is recorded."""

    enabled: bool = True
    """Record the run at all; false makes every tracker call a no-op."""
    uri: str | None = None
    """Tracking store; null: ``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<out_dir>/mlflow.db``."""
    experiment: str = "mlip-pretrain"
    """Experiment name; created on first use."""
    run_name: str | None = None
    """Display name of a new run; null: MLflow picks one."""
    artifact_location: str | None = None
    """Artifact root of a new experiment; null: ``<out_dir>/mlflow-artifacts`` on a store
    without a server (MLflow's own default is relative to the working directory), the
    server's choice on an ``http(s)`` store. Fixed when the experiment is created."""
    system_every: int = 0
    """Every this many steps ``log_metrics`` adds :func:`system_metrics`; 0: never."""
    tags: dict[str, str] | None = None
    """Tags of the run (e.g. a scaling study's ``scale.study``, ``scale.N``), set at start."""

    def validate(self) -> None:
        """``system_every`` must not be negative."""
        if self.system_every < 0:
            raise ConfigError(f"tracking.system_every: got {self.system_every}, expected 0 or more")


def flatten(config: Mapping, prefix: str = "") -> dict[str, object]:
    """Nested mappings as one level of dotted keys: ``{"model": {"channels": 64}}`` -> ``model.channels``."""
    out: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


class Tracker:
    """One MLflow run seen from one rank; on rank != 0 or when disabled every call is a no-op."""

    def __init__(self, cfg: TrackingConfig, out_dir: str | Path, rank: int = 0):
        self.cfg = cfg
        self.out_dir = Path(out_dir).absolute()
        self.active = cfg.enabled and rank == 0
        self._default_uri = f"sqlite:///{self.out_dir / 'mlflow.db'}"
        env = os.environ.get("MLFLOW_TRACKING_URI")
        self._uri = (cfg.uri or env or self._default_uri) if self.active else None
        self._client = None
        self._run_id: str | None = None
        self._ended = False

    @property
    def run_id(self) -> str | None:
        """The run's id once started (kept after ``end``), None on an inactive tracker."""
        return self._run_id

    @property
    def tracking_uri(self) -> str | None:
        """The store this tracker writes to, None on an inactive tracker."""
        return self._uri

    def start(self, config: Mapping, params: Mapping[str, object], tags: Mapping[str, str] | None = None,
              run_id: str | None = None) -> str | None:
        """Open a new run, or with ``run_id`` continue that one; return its id.

        Logs ``config`` flattened as params and as ``config.yaml``, then ``params``, then
        tags (:func:`code_version`, then ``cfg.tags``, then ``tags``). On resume, params already
        logged with the same value are skipped and a changed value raises
        :class:`TrackingError` before anything is written; a tag whose value changed
        (e.g. ``git_commit``) is written as ``resumed.<key>`` so the original stays.
        """
        if not self.active:
            return None
        import yaml
        from mlflow.entities import Param, RunTag
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        new = {k: str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in flatten(config).items()}
        for key, value in params.items():
            value = str(value)[:MAX_PARAM_VAL_LENGTH]
            if new.setdefault(key, value) != value:
                raise TrackingError(f"param {key!r} is given twice: config has {new[key]!r}, params {value!r}")
        config_yaml = yaml.safe_dump(dict(config), sort_keys=False)  # fails here, before any run exists
        all_tags = {**code_version(), **(self.cfg.tags or {}), **(tags or {})}
        client = self._connect()
        if run_id is None:
            run = client.create_run(self._experiment_id(client), run_name=self.cfg.run_name)
        else:
            run = self._resumable(client, run_id, new)
            new = {k: v for k, v in new.items() if k not in run.data.params}
            old_tags = run.data.tags
            all_tags = {(k if old_tags.get(k, v) == v else f"resumed.{k}"): v for k, v in all_tags.items()}
            client.update_run(run_id, status="RUNNING")
        self._run_id, self._ended = run.info.run_id, False
        for chunk in _chunks([Param(k, v) for k, v in new.items()], MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(self._run_id, params=chunk)
        for chunk in _chunks([RunTag(k, str(v)) for k, v in all_tags.items()], MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(self._run_id, tags=chunk)
        client.log_text(self._run_id, config_yaml, "config.yaml")
        return self._run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log ``metrics`` at ``step`` in one batch call; NaN is logged as NaN (MLflow stores
        +-inf as +-1.8e308). Values are converted with ``float()``: a GPU tensor costs a sync."""
        if not self._open():
            return
        from mlflow.entities import Metric
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        values = dict(metrics)
        if self.cfg.system_every and step % self.cfg.system_every == 0:
            values.update(system_metrics())
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in values.items()]
        for chunk in _chunks(batch, MAX_METRICS_PER_BATCH):
            self._client.log_batch(self._run_id, metrics=chunk)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file or folder into the run's artifacts, under ``artifact_path`` if given."""
        if not self._open():
            return
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"log_artifact: {path} does not exist")
        log = self._client.log_artifacts if path.is_dir() else self._client.log_artifact
        log(self._run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        """Close the run as ``FINISHED``, ``FAILED`` or ``KILLED``; a second call does nothing."""
        if status not in STATUSES:
            raise ValueError(f"end: status {status!r}, expected one of {', '.join(STATUSES)}")
        if self._open():
            self._client.set_terminated(self._run_id, status)
            self._ended = True

    def _open(self) -> bool:
        """True when a run is open; False on an inactive tracker or after ``end``."""
        if not self.active or self._ended:
            return False
        if self._run_id is None:
            raise TrackingError("Tracker: call start() before logging")
        return True

    def _connect(self):
        """A client on the store; creates the output folder for the default SQLite file."""
        from mlflow import MlflowClient

        if self._uri == self._default_uri:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        # A new SQLite store prints two INFO lines while creating its tables; quiet them
        # for this call only and put the level back (the logger belongs to mlflow).
        logger = logging.getLogger("mlflow.store.db.utils")
        level = logger.level
        logger.setLevel(logging.WARNING)
        try:
            self._client = MlflowClient(tracking_uri=self._uri)  # ~2 s for a new SQLite file
        finally:
            logger.setLevel(level)
        return self._client

    def _experiment_id(self, client) -> str:
        """The experiment's id, created with an explicit artifact root on a local store."""
        from mlflow.exceptions import MlflowException

        name = self.cfg.experiment
        exp = client.get_experiment_by_name(name)
        if exp is None:
            location = self.cfg.artifact_location
            if location is None and self._uri.split(":", 1)[0] not in ("http", "https", "databricks"):
                location = (self.out_dir / "mlflow-artifacts").as_uri()
            try:
                return client.create_experiment(name, artifact_location=location)
            except MlflowException:  # another process created it in between
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            raise TrackingError(f"experiment {name!r} in {self._uri} is deleted: restore it "
                                "('mlflow experiments restore') or set tracking.experiment to another name")
        return exp.experiment_id

    def _resumable(self, client, run_id: str, new: dict[str, str]):
        """The run to resume, after checking that no param would change."""
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(run_id)
        except MlflowException as e:
            raise TrackingError(f"cannot resume run {run_id}: not found in {self._uri} ({e.message})") from e
        old = run.data.params
        changed = [f"{k!r} was {old[k]!r}, now {v!r}" for k, v in new.items() if k in old and old[k] != v]
        if changed:
            raise TrackingError(f"cannot resume run {run_id}: MLflow params cannot change, and "
                                f"{'; '.join(changed)}. Restore the run's config or start a new run.")
        return run


def code_version(repo: Path | None = None) -> dict[str, str]:
    """Git commit, whether tracked files differ from it, and the installed package version.

    ``repo`` defaults to the folder holding this package. Never raises: without git or
    outside a repository the git fields are ``"unknown"``.
    """
    repo = Path(repo) if repo is not None else Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no") if commit else None
    try:
        version = importlib.metadata.version("mlip-pretrain")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"git_commit": commit or "unknown",
            "git_dirty": "unknown" if dirty is None else str(bool(dirty)).lower(),
            "package_version": version}


def system_metrics(device=None) -> dict[str, float]:
    """Process memory in GiB: ``system/rss_gib``, ``system/peak_rss_gib`` and, when CUDA is
    in use (``device`` or the current CUDA device), ``system/gpu_max_alloc_gib`` (a host-side
    counter: no sync)."""
    out: dict[str, float] = {}
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        out["system/rss_gib"] = int(fields["VmRSS"].split()[0]) / 2**20  # kB
        out["system/peak_rss_gib"] = int(fields["VmHWM"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):  # no procfs: peak only (kB on Linux, bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["system/peak_rss_gib"] = peak / (2**30 if sys.platform == "darwin" else 2**20)
    torch = sys.modules.get("torch")  # never import torch only to find CUDA unused
    if torch is None and device is not None:
        import torch
    if torch is not None and torch.cuda.is_initialized():
        dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        if dev.type == "cuda":
            out["system/gpu_max_alloc_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    return out


def release_store(cfg: TrackingConfig, out_dir: str | Path, run_id: str | None):
    """``(client, run)`` where a release of training run ``run_id`` is registered, checked
    before any work: the run is in the store and its artifact location is reachable.
    None when tracking is off or the run has no id."""
    tracker = Tracker(cfg, out_dir, rank=0)
    if not tracker.active or run_id is None:
        return None
    from mlflow.exceptions import MlflowException

    client = tracker._connect()
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise TrackingError(f"release: training run {run_id} not found in {tracker.tracking_uri} "
                            f"({e.message}); point MLFLOW_TRACKING_URI at the run's store, or pass "
                            "--no-register") from e
    local = _local_path(run.info.artifact_uri)
    if local is not None and not local.parent.exists():
        raise TrackingError(f"release: the MLflow store {tracker.tracking_uri} keeps run {run_id}'s artifacts "
                            f"at {local}, which is not there (was the run folder moved?); register it "
                            "from where the run was, or pass --no-register")
    return client, run


def register_release(store, folder: Path, name: str, tags: Mapping[str, str]) -> str:
    """Register a release folder in the MLflow model registry of ``store``
    (:func:`release_store`) as a new version of ``name``: its files become artifacts of the
    training run (under ``release/``) and the version, linked to that run, carries ``tags``
    (the card's metrics). Returns the version number."""
    from mlflow.exceptions import MlflowException

    client, run = store
    client.log_artifacts(run.info.run_id, str(folder), "release")
    try:
        client.create_registered_model(name)
    except MlflowException:  # already registered: add a version
        pass
    source = f"{run.info.artifact_uri.rstrip('/')}/release"
    version = client.create_model_version(name, source, run_id=run.info.run_id,
                                          tags={k: str(v) for k, v in tags.items()})
    return str(version.version)


def _local_path(uri: str) -> Path | None:
    """The local folder an artifact URI names (``file:`` or a plain path), else None."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return Path(uri) if parsed.scheme == "" else None


# --- scaling studies: reading an experiment back, tagging finished runs, logging fits ----
def _study_tracker(uri: str, experiment: str = "mlip-pretrain") -> tuple[Tracker, object]:
    """(tracker, client) on ``uri``; a SQLite store's folder holds new experiments' artifacts."""
    local = uri.startswith("sqlite:///")
    out = Path(uri[len("sqlite:///"):]).parent if local else Path(".")
    if local:
        out.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(TrackingConfig(uri=uri, experiment=experiment), out, rank=0)
    return tracker, tracker._connect()


def _client(uri: str):
    return _study_tracker(uri)[1]


def prepare_store(uri: str) -> None:
    """Create ``uri``'s tables now, from one process: MLflow builds a new SQLite store's
    schema on first use, and two processes doing that at once (points of a study started
    together) fail in its migrations."""
    _client(uri).search_experiments(max_results=1)


def tag_run(uri: str, run_id: str, tags: Mapping[str, object], metrics: Mapping[str, float] | None = None,
            step: int = 0) -> None:
    """Set ``tags`` (and log ``metrics`` at ``step``) on an existing run, e.g. after it finished."""
    from mlflow.entities import Metric, RunTag

    client = _client(uri)
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    if metrics:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, int(step)) for k, v in metrics.items()])


def experiment_runs(uri: str, experiment: str, tag: str | None = None, value: str | None = None) -> list[dict]:
    """Runs of ``experiment`` (optionally only those whose ``tag`` equals ``value``), each as
    ``{run_id, name, status, tags, params, metrics}`` with each metric's latest value."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise TrackingError(f"experiment {experiment!r} not found in {uri}; check the name "
                            "(mlflow experiments search) or MLFLOW_TRACKING_URI")
    where = f"tags.`{tag}` = '{value}'" if tag else ""
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], where, max_results=1000, page_token=token)
        runs += [{"run_id": r.info.run_id, "name": r.info.run_name, "status": r.info.status,
                  "tags": dict(r.data.tags), "params": dict(r.data.params),
                  "metrics": dict(r.data.metrics)} for r in page]
        token = page.token
        if not token:
            return runs


def log_result_run(uri: str, experiment: str, name: str, tags: Mapping[str, object],
                   metrics: Mapping[str, float], files: list[Path]) -> str:
    """A new, finished run in ``experiment`` holding ``metrics``, ``tags`` and ``files`` as
    artifacts (a scaling fit's table, JSON and plots); returns its id."""
    from mlflow.entities import Metric, RunTag

    tracker, client = _study_tracker(uri, experiment)
    run = client.create_run(tracker._experiment_id(client), run_name=name)
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    finite = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v == v]
    for chunk in _chunks(finite, 500):
        client.log_batch(run.info.run_id, metrics=chunk)
    for f in files:
        client.log_artifact(run.info.run_id, str(f))
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id
