"""A scaling study: a base training config and a grid of sizes, data, budgets and seeds.

A study file (``configs/study/*.yaml``) names a training config and a grid; each point
of the grid's Cartesian product is one training run with its own resolved config, in one
MLflow experiment (the study's name), tagged with

* ``scale.N``: parameters of the model as trained (fidelity heads included);
* ``scale.D``: distinct training atoms, the atoms of the seeded subset of the shards the
  point may draw (``data.sampler.subset_fraction``), summed over fidelities (per
  fidelity as ``scale.D.<fidelity>``);
* ``scale.atoms_seen`` and ``scale.C`` once the point finished: C = the model's measured
  training FLOPs per atom (``models/info.py``, a force-loss step) x atoms seen.

Points are evaluated on ``eval.folder``, which must be held out (not ``data.folder``).
Paths in the study file are relative to it; ``data.folder``/``eval.folder`` overrides are
relative to the working directory, like every training config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from pathlib import Path

from common.config import ConfigError, load_config, load_yaml, to_dict
from pretrain.config import TrainConfig, load_train_config


@dataclasses.dataclass
class ModelSize:
    """One model size of the grid: a model config file and/or keys set on the base model."""

    name: str
    """Short name used in point names (``c8``, ``mace-s``)."""
    config: str | None = None
    """Model YAML replacing the base config's model (relative to the study file)."""
    set: dict[str, bool | int | float | str] | None = None
    """Model keys set on top, e.g. ``{channels: 8, hidden: 8}``."""


@dataclasses.dataclass
class GridConfig:
    """The axes of the study; every combination is one point."""

    models: list[ModelSize] | None = None
    """Explicit model sizes (or leave null and give ``width``/``depth`` multipliers)."""
    width: list[float] | None = None
    """Multipliers of the base model's ``channels`` and ``hidden``."""
    depth: list[float] | None = None
    """Multipliers of the base model's ``layers``."""
    data_fractions: list[float] = dataclasses.field(default_factory=lambda: [1.0])
    """Fractions of each dataset x fidelity group trained on (nested, seeded subsets)."""
    steps: list[int] | None = None
    """Training budgets as optimizer steps."""
    atoms: list[int] | None = None
    """Training budgets as atoms seen (turned into steps from the sampler's plan)."""
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    """Seeds of the weights and the data order (``seed``, ``data.sampler.seed``)."""

    def validate(self) -> None:
        if self.models is not None and (self.width or self.depth):
            raise ConfigError("grid: give models or width/depth multipliers, not both")
        if (self.steps is None) == (self.atoms is None):
            raise ConfigError("grid: give exactly one budget axis, steps: [...] or atoms: [...]")
        for key in ("width", "depth", "data_fractions", "steps", "atoms", "seeds", "models"):
            values = getattr(self, key)
            if values is not None and not values:
                raise ConfigError(f"grid.{key}: empty list; omit it or give at least one value")
        if not all(0 < f <= 1 for f in self.data_fractions):
            raise ConfigError(f"grid.data_fractions: got {self.data_fractions}, expected values in (0, 1]")
        if any(v <= 0 for v in (self.width or []) + (self.depth or []) + (self.steps or []) + (self.atoms or [])):
            raise ConfigError("grid: width, depth, steps and atoms must be positive")


@dataclasses.dataclass
class SlurmConfig:
    """The sbatch array script (``scale run --launcher slurm``): one task per pending point."""

    partition: str | None = None
    account: str | None = None
    time: str = "04:00:00"
    cpus_per_task: int = 8
    gpus_per_task: int = 0
    max_parallel: int | None = None
    """At most this many array tasks at once (``--array=...%N``)."""
    setup: list[str] = dataclasses.field(default_factory=list)
    """Shell lines run before the point (``module load ...``, ``source .venv/bin/activate``)."""
    extra: list[str] = dataclasses.field(default_factory=list)
    """Further ``#SBATCH`` options, e.g. ``--qos=high``."""


@dataclasses.dataclass
class StudyConfig:
    """A scaling study (``mlip-pretrain scale run STUDY.yaml``)."""

    name: str
    """Study name: the MLflow experiment and the ``scale.study`` tag of every point."""
    base: str
    """Training config every point starts from (relative to the study file)."""
    grid: GridConfig
    out: str = "runs/study"
    """Study folder: ``points/<name>/`` per point, ``fit/``, the MLflow store by default."""
    overrides: list[str] = dataclasses.field(default_factory=list)
    """Dotted overrides of the base config for every point (``eval.folder=...``)."""
    subset_seed: int = 0
    """Seed of the data subsets (the same for every point, so D depends on the fraction only)."""
    max_attempts: int = 2
    """Tries per point and invocation (a retry resumes from the point's last checkpoint)."""
    procs_per_point: int = 1
    """Processes per point (torchrun on one node when > 1)."""
    tracking_uri: str | None = None
    """MLflow store; null: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<out>/mlflow.db``."""
    slurm: SlurmConfig = dataclasses.field(default_factory=SlurmConfig)

    def validate(self) -> None:
        if self.max_attempts < 1 or self.procs_per_point < 1:
            raise ConfigError("max_attempts and procs_per_point must be >= 1")
        if not self.name or any(c in self.name for c in "/'\" "):
            raise ConfigError(f"name: got {self.name!r}, expected a non-empty name without / quotes or spaces")


@dataclasses.dataclass
class Point:
    """One run of the study."""

    index: int
    name: str
    model: str
    fraction: float
    budget: str  # "steps" or "atoms"
    amount: int
    seed: int
    overrides: list[str]


def load_study(path: str | Path, overrides: list[str] = ()) -> StudyConfig:
    """Read and validate a study file; relative ``base``/``out``/model paths are made absolute."""
    path = Path(path)
    study = load_config(StudyConfig, path, overrides)
    here = path.resolve().parent
    study.base = str((here / study.base).resolve())
    study.out = str((here / study.out).resolve())
    for m in study.grid.models or []:
        if m.config is not None:
            m.config = str((here / m.config).resolve())
    if not Path(study.base).is_file():
        raise ConfigError(f"{path}: base: training config {study.base} not found")
    return study


def tracking_uri(study: StudyConfig) -> str:
    """The study's MLflow store."""
    return study.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(study.out) / 'mlflow.db'}"


def base_config(study: StudyConfig) -> TrainConfig:
    """The base training config with the study's overrides (checked: held-out eval)."""
    cfg = load_train_config(study.base, study.overrides)
    if not cfg.eval.folder:
        raise ConfigError(f"study {study.name}: the base config has no eval.folder; every point is "
                          "evaluated on held-out shards: add eval.folder=<held-out shards> to overrides")
    if Path(cfg.eval.folder).resolve() == Path(cfg.data.folder).resolve():
        raise ConfigError(f"study {study.name}: eval.folder {cfg.eval.folder} is the training data; "
                          "build a held-out split (mlip-pretrain data build) and point eval.folder at it")
    return cfg


def _sizes(study: StudyConfig, base: TrainConfig) -> list[tuple[str, list[str]]]:
    """(name, model overrides) of every model size."""
    g = study.grid
    if g.models is not None:
        sizes = []
        for m in g.models:
            extra = [f"model={json.dumps(load_yaml(m.config))}"] if m.config else []
            sizes.append((m.name, extra + [f"model.{k}={json.dumps(v)}" for k, v in (m.set or {}).items()]))
        return sizes
    sizes = []
    for w, d in itertools.product(g.width or [1.0], g.depth or [1.0]):
        over = [f"model.channels={max(1, round(base.model.channels * w))}",
                f"model.hidden={max(1, round(base.model.hidden * w))}",
                f"model.layers={max(1, round(base.model.layers * d))}"]
        sizes.append((f"w{w:g}-d{d:g}", over))
    return sizes


def expand(study: StudyConfig) -> list[Point]:
    """Every point of the grid, in a fixed order (model, fraction, budget, seed)."""
    g = study.grid
    base = base_config(study)
    budget, amounts = ("steps", g.steps) if g.steps is not None else ("atoms", g.atoms)
    points = []
    for (model, over), fraction, amount, seed in itertools.product(_sizes(study, base), g.data_fractions,
                                                                   amounts, g.seeds):
        unit = "st" if budget == "steps" else "at"
        name = f"{model}_f{fraction:g}_{amount}{unit}_s{seed}"
        points.append(Point(len(points), name, model, fraction, budget, int(amount), seed, over))
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise ConfigError(f"study {study.name}: two grid points share a name; model names must differ")
    return points


def point_folder(study: StudyConfig, point: Point) -> Path:
    return Path(study.out) / "points" / point.name


def point_config(study: StudyConfig, point: Point) -> TrainConfig:
    """The resolved training config of ``point`` (steps from an atoms budget included)."""
    over = [*study.overrides, *point.overrides, f"seed={point.seed}", f"data.sampler.seed={point.seed}",
            f"data.sampler.subset_fraction={point.fraction}", f"data.sampler.subset_seed={study.subset_seed}",
            f"out={point_folder(study, point)}", f"tracking.experiment={study.name}",
            f"tracking.run_name={point.name}", f"tracking.uri={tracking_uri(study)}"]
    if tracking_uri(study).startswith("sqlite:///"):  # one artifact root for the study, not the first point's
        over.append(f"tracking.artifact_location={(Path(study.out) / 'mlflow-artifacts').as_uri()}")
    if point.budget == "steps":
        over.append(f"steps={point.amount}")
    cfg = load_train_config(study.base, over)
    if point.budget == "atoms":
        cfg.steps = steps_for_atoms(cfg, study.procs_per_point, point.amount)
    for section in (cfg.data, cfg.eval):  # absolute: the point runs from any working directory
        section.folder = str(Path(section.folder).resolve())
    if not cfg.tracking.enabled:
        raise ConfigError(f"study {study.name}: tracking.enabled is false; a study's points are MLflow runs")
    return cfg


def measure(cfg: TrainConfig) -> dict:
    """N (parameters as trained), D (subset atoms, per fidelity) and the training FLOPs per
    atom of a point, counted on its own first batches in its loss mode (``pretrain/flops.py``)."""
    import torch  # noqa: PLC0415

    from common.fidelities import FidelityTable  # noqa: PLC0415
    from data_pipeline.stream.dataset import ShardedDataset  # noqa: PLC0415
    from data_pipeline.stream.sampler import AtomBudgetSampler  # noqa: PLC0415
    from models.build import build_model  # noqa: PLC0415
    from pretrain.flops import run_flops  # noqa: PLC0415

    dataset = ShardedDataset(cfg.data.folder)
    table = FidelityTable.from_manifest(dataset.manifest)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, table)
    n = sum(p.numel() for p in model.parameters())
    d = AtomBudgetSampler.from_dataset(dataset, cfg.data.sampler).distinct_atoms
    return {"N": n, "D": sum(d.values()), "D_per_fidelity": d,
            "flops_per_atom": run_flops(cfg, model, table.names)["per_atom"]}


def steps_for_atoms(cfg: TrainConfig, world: int, atoms: int) -> int:
    """Optimizer steps until at least ``atoms`` atoms are seen over all ranks, walking the
    sampler's plan (metadata only) as training would: ``grad_accum`` batches per step."""
    from data_pipeline.stream.dataset import ShardedDataset  # noqa: PLC0415
    from data_pipeline.stream.sampler import AtomBudgetSampler  # noqa: PLC0415

    sampler = AtomBudgetSampler.from_dataset(ShardedDataset(cfg.data.folder), cfg.data.sampler, 0, world)
    micro = 0
    while sum(sampler.atoms_seen.values()) < atoms:
        if sampler.step >= sampler.steps_per_epoch:
            sampler.set_epoch(sampler.epoch + 1)
        sampler.advance()
        micro += 1
    return max(1, -(-micro // cfg.engine.grad_accum))


def config_hash(cfg: TrainConfig) -> str:
    """What a finished point is checked against on rerun (tracking excluded: where a run is
    recorded does not change what it trains)."""
    data = to_dict(cfg)
    del data["tracking"]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
