"""Regenerate the held-out split of the shipped sample (deterministic):
``python data/sample-heldout/make_heldout.py``.

New structures drawn like ``data/sample/make_sample.py``'s but from other seeds (40 alloys
labelled at both fidelities, EMT and EMT+ASAP cutoff, and 12 free clusters at EMT), so a
model trained on ``data/sample`` is evaluated on structures it never saw: the held-out
``eval.folder`` of ``configs/study/tiny.yaml``.
"""

from __future__ import annotations

import gzip
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository: the generator is test tooling

from tests.synthetic import label, labelled_frames, write_frames  # noqa: E402


def _gz(path: Path) -> None:
    with open(path, "rb") as src, gzip.GzipFile(str(path) + ".gz", "wb", mtime=0) as dst:
        shutil.copyfileobj(src, dst)
    path.unlink()


def main() -> None:
    alloys = labelled_frames(40, seed=4051, method="emt", max_atoms=24)
    _gz(write_frames(HERE / "emt" / "alloys.extxyz", alloys))
    asap = []
    for atoms in alloys:  # the same structures at the second fidelity
        a = atoms.copy()
        labels = label(a, "emt-asap")
        a.info["REF_energy"], a.arrays["REF_forces"] = labels["energy"], labels["forces"]
        a.info["REF_stress"] = labels["stress"]
        asap.append(a)
    _gz(write_frames(HERE / "emt-asap" / "alloys.extxyz", asap))
    _gz(write_frames(HERE / "emt" / "clusters.extxyz",
                     labelled_frames(12, seed=4052, method="emt", clusters=1.0, max_atoms=20)))


if __name__ == "__main__":
    main()
