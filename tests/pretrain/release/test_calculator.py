"""The ASE calculator on a release: the trained model's numbers, fidelities by name, coverage
refused by default, batched predict, relaxation and NVE MD."""

from __future__ import annotations

import numpy as np
import pytest

from tests.pretrain.release.structures import raw_forward, structures

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


def test_calculator_equals_trained_model(release, run):
    from pretrain.release import MLIPCalculator
    from pretrain.release.loader import load_model

    trained = load_model(run)
    for atoms in structures():
        for fid in ("EMT", "EMT-asap"):
            ref = raw_forward(trained, atoms, fid)
            atoms.calc = MLIPCalculator.from_release(release, fidelity=fid)
            assert atoms.get_potential_energy() == pytest.approx(float(ref["energy"][0]), rel=1e-6)
            np.testing.assert_allclose(atoms.get_forces(), ref["forces"], rtol=1e-5, atol=1e-6)
            if atoms.pbc.all():
                np.testing.assert_allclose(atoms.get_stress(), ref["stress"][0], rtol=1e-4, atol=1e-7)


def test_calculator_fidelity_selection_and_inputs(release):
    from common.fidelities import FidelityError
    from pretrain.release import CoverageError, CoverageWarning, MLIPCalculator

    with pytest.raises(FidelityError, match=r"'PBE' is not one this model has; it has \['EMT', 'EMT-asap'\]"):
        MLIPCalculator.from_release(release, fidelity="PBE")
    cell, cluster = structures()
    a = MLIPCalculator.from_release(release, fidelity="EMT").predict([cell])[0]["energy"]
    b = MLIPCalculator.from_release(release, fidelity="EMT-asap").predict([cell])[0]["energy"]
    assert a != b  # two heads, two answers
    from ase import Atoms

    calc = MLIPCalculator.from_release(release, fidelity="EMT")
    oxide = Atoms("CuO", positions=[[0, 0, 0], [0, 0, 1.9]])
    with pytest.raises(CoverageError, match="O not in the 'EMT' training data .*no elemental reference"):
        calc.predict([oxide])  # refused by default: its total energy would lack O's reference
    with pytest.warns(CoverageWarning, match="O not in the 'EMT' training data"):
        MLIPCalculator.from_release(release, fidelity="EMT", coverage="warn").predict([oxide])
    cluster.info["charge"] = 99
    with pytest.raises(ValueError, match="charge 99 outside"):
        calc.predict([cluster])


def test_predict_matches_single_points(release):
    from pretrain.release import MLIPCalculator

    calc = MLIPCalculator.from_release(release, fidelity="EMT", dtype="float64")
    many = list(structures()) * 3
    batched = calc.predict(many, max_atoms=40)
    for atoms, r in zip(many, batched):
        atoms.calc = calc
        assert r["energy"] == pytest.approx(atoms.get_potential_energy(), rel=1e-10)
        np.testing.assert_allclose(r["forces"], atoms.get_forces(), atol=1e-9)


def test_bfgs_relaxation_and_nve_md(release):
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet
    from ase.optimize import BFGS

    from pretrain.release import MLIPCalculator

    _, cluster = structures()
    cluster.calc = MLIPCalculator.from_release(release, fidelity="EMT", dtype="float64")
    assert BFGS(cluster, logfile=None).run(fmax=0.01, steps=300)
    assert np.abs(cluster.get_forces()).max() < 0.01
    MaxwellBoltzmannDistribution(cluster, temperature_K=300, rng=np.random.default_rng(0))
    e0 = cluster.get_total_energy()
    energies = []
    dyn = VelocityVerlet(cluster, 0.5 * units.fs)
    dyn.attach(lambda: energies.append(cluster.get_total_energy()), interval=50)
    dyn.run(1000)
    drift = max(abs(e - e0) for e in energies) / len(cluster)
    assert drift < 1e-3, f"NVE energy drift {drift:.2e} eV/atom over 1000 steps"
