"""``release export``: the torch.export program of a tiny release of each family matches the
eager release model on structures of different sizes, after a save/load round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.cluster import Icosahedron
from safetensors.torch import save_file

from common.config import to_dict
from common.fidelities import FidelityTable
from models.build import ModelConfig, build_model
from models.layers.conv import neighbour_slots
from pretrain.release.export import INPUTS, ExportError, compare, default_out, export_release
from pretrain.release.format import CONFIG, FORMAT, FORMAT_VERSION, UNITS, WEIGHTS, check_sums, write_sums
from pretrain.release.loader import load_release

# the smallest configs that still run every kind of op of their family: MACE with a
# product basis (correlation 2) and l = 1 node features, eSEN with m = 1 SO(2) paths
TINY = {
    "mace": {"family": "mace", "cutoff": 3.0, "channels": 4, "hidden": 4, "lmax": 1,
             "hidden_lmax": 1, "correlation": 2, "layers": 2, "num_basis": 4, "avg_neighbors": 10.0},
    "esen": {"family": "esen", "cutoff": 3.0, "channels": 4, "hidden": 4, "lmax": 1, "mmax": 1,
             "layers": 2, "num_basis": 4, "avg_neighbors": 10.0},
}


def write_release(folder: Path, family: str, forces: str = "conservative", zbl: bool = False,
                  **extra) -> Path:
    """A release folder of a freshly initialised tiny model (``extra``: more model settings):
    config.json (as pretrain.release.create writes it), model.safetensors, SHA256SUMS."""
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY[family], direct_forces=forces == "direct", zbl=zbl, **extra)
    table = FidelityTable(["PBE", "r2SCAN"], {"PBE": {"Cu": -3.5, "Au": -3.2}, "r2SCAN": {"Cu": -3.9}},
                          {"PBE": ["Cu", "Au"], "r2SCAN": ["Cu"]})
    model = build_model(cfg, table)
    with torch.no_grad():  # fidelity conditioning and delta heads start as no-ops: make them act
        for name, p in model.named_parameters():
            if ".film." in name:
                p.normal_(0.0, 0.3)
        if cfg.delta:
            model.heads.out_w.normal_(0.0, 0.3)
    folder.mkdir(parents=True)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": f"tiny-{family}",
              "model": {**to_dict(cfg), "kernels": "auto"}, "cutoff": cfg.cutoff,
              "fidelities": table.to_json(), "units": UNITS, "forces": forces, "uncertainty": None, "targets": []}
    (folder / CONFIG).write_text(json.dumps(config, indent=1))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS))
    write_sums(folder)
    return folder


def sizes():
    """A 2-atom dimer, a 13-atom cluster, a 32-atom periodic cell (and all three at once)."""
    cluster = Icosahedron("Cu", 2)
    cluster.numbers[::4] = 79
    dimer = Atoms("CuAu", positions=[[0, 0, 0], [0.1, 0.2, 2.3]])
    cell = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    cell.rattle(0.05, seed=1)
    return [[dimer], [cluster], [cell], [dimer, cluster, cell]]


@pytest.mark.slow
@pytest.mark.parametrize("family,dtype,tol,forces,zbl,extra", [
    ("mace", "float32", (1e-6, 1e-5), "conservative", False, {}),
    ("esen", "float64", (1e-12, 1e-10), "conservative", True, {}),
    ("mace", "float32", (1e-6, 1e-5), "direct", True, {}),
    ("esen", "float64", (1e-12, 1e-10), "conservative", False,
     {"fidelity_conditioning": "layers", "delta": {"r2SCAN": "PBE"}})])
def test_export_matches_eager(tmp_path, family, dtype, tol, forces, zbl, extra):
    """The program serves the release's forces: -dE/dr, or a direct-force release's head
    (with the ZBL prior's exact forces where the model has it); a model with per-layer
    fidelity conditioning and a delta head exports too."""
    folder = write_release(tmp_path / "rel", family, forces, zbl, **extra)
    done = export_release(folder, dtype=dtype)
    assert done.program == tmp_path / "rel.pt2" and done.sidecar == tmp_path / "rel.json"
    check_sums(folder)  # nothing was written into the release
    side = json.loads(done.sidecar.read_text())
    assert side["dtype"] == dtype and side["cutoff"] == 3.0 and side["forces"] == forces
    assert [f["name"] for f in side["fidelities"]] == ["PBE", "r2SCAN"]
    assert [i["name"] for i in side["inputs"]] == [name for name, *_ in INPUTS]

    program = torch.export.load(str(done.program)).module()
    model = load_release(folder).potential.to(getattr(torch, dtype))
    for atoms_list in sizes():
        for fidelity in (0, 1):
            diff = compare(program, model, atoms_list, fidelity, direct=forces == "direct")
            assert diff["energy_rel"] < tol[0] and diff["forces_abs"] < tol[1], (atoms_list, diff)
    # one isolated atom: no edges at all (E = 0, the neighbour slots' width clamps to 1)
    assert compare(program, model, [Atoms("Cu")], direct=forces == "direct")["energy_rel"] < tol[0]
    if forces == "direct":  # the direct head's forces, which are not -dE/dr
        conservative = compare(program, model, sizes()[1], 0, direct=False)
        assert conservative["forces_abs"] > 1e-3, "the program served -dE/dr, not the direct head"


@pytest.mark.slow
def test_aoti_flag_ends_in_one_line_and_keeps_the_program(tmp_path):
    """``--aoti``: the package is compiled and run on the example structures in a child
    process (generated C++ code can abort the process it runs in); if it fails, one line
    says so, exit 2, and the torch.export program beside it is written and valid."""
    import subprocess
    import sys

    folder = write_release(tmp_path / "rel", "mace")
    r = subprocess.run([sys.executable, "-m", "launch.cli", "release", "export", str(folder), "--aoti"],
                       cwd=Path(__file__).resolve().parents[3], capture_output=True, text=True, timeout=900)
    others = [ln for ln in r.stderr.splitlines() if not ln.startswith("mlip-pretrain: error")]
    assert not [ln for ln in others if "Traceback" in ln or "terminate called" in ln], r.stderr[-2000:]
    if r.returncode == 0:  # a torch whose AOTInductor runs the model: the package was checked
        assert (tmp_path / "rel-aoti.pt2").exists() and "AOTInductor package" in r.stdout
    else:
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("mlip-pretrain: error")]
        assert r.returncode == 2 and len(errors) == 1 and "AOTInductor" in errors[0], r.stderr[-2000:]
    program = torch.export.load(str(tmp_path / "rel.pt2")).module()
    model = load_release(folder).potential
    assert compare(program, model, sizes()[1])["forces_abs"] < 1e-5


def test_export_refuses_to_write_into_the_release(tmp_path):
    folder = tmp_path / "rel"
    folder.mkdir()
    with pytest.raises(ExportError, match="inside the release folder"):
        default_out(folder, folder / "model.pt2")
    with pytest.raises(ExportError, match="must end in .pt2"):
        default_out(folder, tmp_path / "model.zip")
    assert default_out(folder, None) == tmp_path / "rel.pt2"


def test_neighbour_slots_without_edges():
    """The export-friendly slot layout: an empty edge list still gives one (empty) slot per
    receiver, and counts do not depend on the largest index being present."""
    empty = torch.zeros(0, dtype=torch.long)
    slots = neighbour_slots(empty, empty, 3)
    assert slots.width == 1 and slots.edge.tolist() == [0, 0, 0]
    i, j = torch.tensor([0, 0, 1]), torch.tensor([1, 2, 0])  # atom 2 receives nothing
    slots = neighbour_slots(i, j, 3)
    assert slots.width == 2 and slots.edge.tolist() == [0, 1, 2, 3, 3, 3]
    assert slots.sender.tolist() == [1, 2, 0, 0, 0, 0]
