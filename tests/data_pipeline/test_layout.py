"""The package's layout rule: the shared contract at the root of ``data_pipeline/`` never
imports a stage, and the two stages never import each other.

``data_pipeline/build/`` (raw files -> shards) and ``data_pipeline/stream/`` (shards ->
batches) both stand on the root modules (schema, shards, manifest reading, keys, neighbor
lists, batch assembly, Ray session) and on the ground floor, ``common/``. An arrow from the root into a stage, or from one
stage into the other, would tie the reader of shards to the code that writes them (or the
reverse); these tests read every module's imports (at any depth, function-level ones
included) with :mod:`ast` and name each arrow that breaks the rule.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "data_pipeline"
STAGES = ("build", "stream")
# never imported by the data pipeline (ARCHITECTURE: dependencies point down the data flow)
FOREIGN = ("models", "pretrain", "launch", "tests", "benchmarks")


def _module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``tree``; ``from P import X`` counts as
    ``P.X`` (X may be a submodule, and ``from data_pipeline import build`` is a stage)."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            parent = node.module
            if node.level:  # relative: `from . import x`, `from ..stream import y`
                parent = ".".join(base[: len(base) - node.level + 1] + [node.module or ""]).rstrip(".")
            found += [(node.lineno, f"{parent}.{a.name}") for a in node.names]
    return found


def _stage(module: str) -> str | None:
    """``build``, ``stream`` or None (the shared root) for a ``data_pipeline`` module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def layout_violations(package: Path = PACKAGE) -> tuple[list[str], dict[str | None, int]]:
    """Each import that breaks the rule, as ``file:line: importer -> imported (why)``, and the
    number of modules read per place (root: None)."""
    bad, counts = [], {}
    for path in sorted(package.rglob("*.py")):
        module = _module_name(path, package)
        where = _stage(module)
        counts[where] = counts.get(where, 0) + 1
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, target in _targets(tree, module, path.name == "__init__.py"):
            top = target.split(".")[0]
            rel = f"{path.relative_to(package.parent)}:{line}: {module} -> {target}"
            if top in FOREIGN:
                bad.append(f"{rel} (the data pipeline imports nothing from {top}/)")
            if top != package.name:
                continue
            into = _stage(target)
            if into is None or into == where:
                continue
            if where is None:
                bad.append(f"{rel} (the shared root must not import a stage: move the name it "
                           f"needs to the root, or the importing code into {into}/)")
            else:
                bad.append(f"{rel} ({where}/ must not import {into}/: share the name through the root)")
    return bad, counts


def test_no_import_points_from_the_root_into_a_stage_or_across_stages():
    bad, counts = layout_violations()
    # the scan must see the whole package, or an empty scan would pass
    assert counts.get(None, 0) >= 8 and counts.get("build", 0) >= 8 and counts.get("stream", 0) >= 6, counts
    assert not bad, "imports against the layout rule:\n" + "\n".join(bad)


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root / "data_pipeline"


def test_the_check_names_each_kind_of_bad_import(tmp_path):
    package = _write(tmp_path, {
        "data_pipeline/__init__.py": "from data_pipeline import stream\n",
        "data_pipeline/schema.py": "def f():\n    from data_pipeline.build.recipe import Recipe\n",
        "data_pipeline/keys.py": "from . import build\n",
        "data_pipeline/shards.py": "import data_pipeline.schema\n",  # root -> root: fine
        "data_pipeline/build/__init__.py": "",
        "data_pipeline/build/driver.py": "from ..stream.dataset import ShardedDataset\n"
                                         "from data_pipeline.shards import write_shard\n",
        "data_pipeline/build/sources/__init__.py": "from data_pipeline.build.recipe import Recipe\n",
        "data_pipeline/stream/__init__.py": "",
        "data_pipeline/stream/collate.py": "import models.potential\nfrom .dataset import X\n",
    })
    bad, counts = layout_violations(package)
    assert counts == {None: 4, "build": 3, "stream": 2}
    found = sorted(b.split(" (")[0] for b in bad)
    assert found == [
        "data_pipeline/__init__.py:1: data_pipeline -> data_pipeline.stream",
        "data_pipeline/build/driver.py:1: data_pipeline.build.driver -> data_pipeline.stream.dataset.ShardedDataset",
        "data_pipeline/keys.py:1: data_pipeline.keys -> data_pipeline.build",
        "data_pipeline/schema.py:2: data_pipeline.schema -> data_pipeline.build.recipe.Recipe",
        "data_pipeline/stream/collate.py:1: data_pipeline.stream.collate -> models.potential",
    ], bad


def test_importing_the_root_loads_no_stage():
    """At run time too (an import the text does not show, e.g. by importlib)."""
    root = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    code = (f"import sys, data_pipeline\nfor m in {root!r}: __import__('data_pipeline.' + m)\n"
            "print(sorted(m for m in sys.modules if m.startswith(('data_pipeline.build', "
            "'data_pipeline.stream'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=PACKAGE.parent, check=True).stdout.strip()
    assert out == "[]", f"importing the root modules {root} loaded stage modules {out}"
