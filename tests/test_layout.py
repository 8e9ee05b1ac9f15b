"""The project's layout rule: dependencies follow the data flow and never climb back.

``common/`` (the ground floor) imports no stage; ``data_pipeline/`` imports no model, no
training and no launcher; ``models/`` know nothing of training, releases, ranks,
DeepSpeed or MLflow and read the data stage only through its contract at the root
(``data_pipeline/keys.py``, ``batch.py``, ...); training (``pretrain/`` outside its
release stage) never imports the release stage downstream of it; nothing but
``launch/`` imports the launchers; only ``pretrain/engine.py`` imports deepspeed and only
``pretrain/tracking.py`` imports mlflow. Every import is read with :mod:`ast` (function-
level ones included), and each arrow that breaks a rule is named.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.data_pipeline.test_layout import _module_name, _targets

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "data_pipeline", "models", "pretrain", "launch", "lammps_glue")
#: the GPL-2.0 LAMMPS glue: only the CLI imports it (lazily), so the Apache-2.0 core never does
GPL = "lammps_glue"

#: (importer, forbidden imports, why); an importer is a module or a package prefix, and a
#: rule for a package covers its subpackages unless a longer importer names them
RULES = (
    ("common", ("data_pipeline", "models", "pretrain", "launch", GPL), "the ground floor imports no stage"),
    ("data_pipeline", ("models", "pretrain", "launch", GPL), "the data stage is upstream of models and training"),
    ("models", ("pretrain", "launch", "data_pipeline.build", "data_pipeline.stream", "deepspeed", "mlflow",
                "ray", "torch.distributed", GPL),
     "models know nothing of training, releases, ranks, DeepSpeed or MLflow, and read data only "
     "through the contract at data_pipeline's root"),
    ("pretrain", ("pretrain.release", "launch", GPL), "training is upstream of the release stage and the launchers"),
    ("pretrain.release", ("launch", GPL), "the release stage does not import the launchers or the GPL glue"),
    ("launch", (GPL,), "only the CLI runs the GPL-2.0 LAMMPS glue"),
    ("launch.cli", (), "the CLI runs every command"),
    (GPL, ("launch",), "the LAMMPS glue is downstream of the release stage, beside the launchers"),
)
#: third-party packages only one module may import
ONLY = {"deepspeed": "pretrain.engine", "mlflow": "pretrain.tracking", "lammps": "lammps_glue.library",
        "mpi4py": "lammps_glue.library"}


def _rule(module: str):
    """The most specific rule whose importer covers ``module`` (``pretrain.release`` has its
    own, so the release stage may import itself while training may not)."""
    found = [r for r in RULES if module == r[0] or module.startswith(r[0] + ".")]
    return max(found, key=lambda r: len(r[0]), default=None)


def _covers(prefix: str, target: str) -> bool:
    return target == prefix or target.startswith(prefix + ".")


def violations(root: Path = ROOT, packages=PACKAGES) -> tuple[list[str], int]:
    """Every import against the rules, as ``file:line: importer -> imported (why)``, and
    the number of modules read."""
    bad, read = [], 0
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            module = _module_name(path, root / package)
            read += 1
            rule = _rule(module)
            tree = ast.parse(path.read_text(), filename=str(path))
            for line, target in _targets(tree, module, path.name == "__init__.py"):
                where = f"{path.relative_to(root)}:{line}: {module} -> {target}"
                if rule is not None and any(_covers(f, target) for f in rule[1]):
                    bad.append(f"{where} ({rule[2]})")
                    continue
                for lib, owner in ONLY.items():
                    if _covers(lib, target) and module != owner:
                        bad.append(f"{where} (only {owner} imports {lib})")
    return bad, read


def test_no_import_climbs_back_up_the_data_flow():
    bad, read = violations()
    assert read >= 80, read  # the scan must see the whole project, or an empty scan would pass
    assert not bad, "imports against the layout rule:\n" + "\n".join(bad)


def test_the_check_names_each_kind_of_bad_import(tmp_path):
    files = {
        "common/config.py": "from data_pipeline import keys\n",
        "data_pipeline/batch.py": "def f():\n    import models.potential\n",
        "models/potential.py": "from data_pipeline.stream.collate import BatchBuilder\nfrom data_pipeline.keys import X\n",
        "models/info.py": "import deepspeed\n",
        "pretrain/trainer.py": "from pretrain.release.loader import load_model\nfrom pretrain.loss import Loss\n",
        "pretrain/release/create.py": "from pretrain.release.format import X\nfrom pretrain.weights import Y\n",
        "pretrain/release/verify.py": "import launch.cli\n",
        "pretrain/tracking.py": "import mlflow\n",
        "launch/demo.py": "from lammps_glue.run import run_lammps\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    bad, read = violations(tmp_path)
    assert read == len(files)
    assert sorted(b.split(" (")[0] for b in bad) == [
        "common/config.py:1: common.config -> data_pipeline.keys",
        "data_pipeline/batch.py:2: data_pipeline.batch -> models.potential",
        "launch/demo.py:1: launch.demo -> lammps_glue.run.run_lammps",
        "models/info.py:1: models.info -> deepspeed",
        "models/potential.py:1: models.potential -> data_pipeline.stream.collate.BatchBuilder",
        "pretrain/release/verify.py:1: pretrain.release.verify -> launch.cli",
        "pretrain/trainer.py:1: pretrain.trainer -> pretrain.release.loader.load_model",
    ], bad


def test_every_package_is_installed():
    """The console script runs from the installed package, not the checkout: each top-level
    package must be in pyproject's package list (a missing one breaks `mlip-pretrain`)."""
    import fnmatch
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    # tests and benchmarks run from the checkout (pytest, python -m benchmarks.X), never installed
    on_disk = sorted(p.parent.name for p in ROOT.glob("*/__init__.py")
                     if p.parent.name not in ("tests", "benchmarks"))
    assert set(PACKAGES) <= set(on_disk), on_disk
    missing = [name for name in on_disk if not any(fnmatch.fnmatch(name, pattern) for pattern in include)]
    assert not missing, f"packages not installed by pyproject.toml: {missing}"
