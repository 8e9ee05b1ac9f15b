"""Regenerate the shipped sample (deterministic): ``python data/sample/make_sample.py``.

The same 120 alloy structures labelled at two levels of theory (ASE's EMT, and EMT with
the ASAP cutoff), in three formats, plus 40 free clusters and a file with deliberate
faults, so the demo exercises every reader, the fidelity mixing and the reject path.
"""

from __future__ import annotations

import gzip
import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository: the generator is test tooling

from tests.synthetic import label, labelled_frames, with_calculator, write_frames  # noqa: E402


def main() -> None:
    alloys = labelled_frames(120, seed=2026, method="emt", max_atoms=24)
    for k in range(3):
        plain = write_frames(HERE / "emt" / f"alloys-{k}.extxyz", alloys[k * 40:(k + 1) * 40])
        with open(plain, "rb") as src, gzip.GzipFile(str(plain) + ".gz", "wb", mtime=0) as dst:
            shutil.copyfileobj(src, dst)
        plain.unlink()
    asap = []
    for atoms in alloys:  # the same structures, relabelled at the second fidelity
        a = atoms.copy()
        labels = label(a, "emt-asap")
        a.info["REF_energy"], a.arrays["REF_forces"] = labels["energy"], labels["forces"]
        a.info["REF_stress"] = labels["stress"]
        asap.append(a)
    (HERE / "emt-asap" / "alloys.db").unlink(missing_ok=True)
    write_frames(HERE / "emt-asap" / "alloys.db", with_calculator(asap))
    clusters = labelled_frames(40, seed=7, method="emt", clusters=1.0, max_atoms=20)
    path = HERE / "emt" / "clusters.aselmdb"
    path.unlink(missing_ok=True)
    Path(str(path) + "-lock").unlink(missing_ok=True)
    write_frames(path, with_calculator(clusters))
    Path(str(path) + "-lock").unlink(missing_ok=True)
    faults = labelled_frames(6, seed=9, method="emt", max_atoms=12)
    faults[1].info["REF_energy"] = float("nan")
    faults[4].positions[1] = faults[4].positions[0] + np.array([0.2, 0.0, 0.0])
    write_frames(HERE / "emt" / "with-faults.extxyz", faults)


if __name__ == "__main__":
    main()
