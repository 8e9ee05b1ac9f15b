"""Every validation reason, each triggered by a frame that breaks exactly one rule."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from data_pipeline.build.recipe import ExtraConfig, SourceConfig, ValidationConfig
from data_pipeline.build.sources.base import RawFrame
from data_pipeline.build.validate import REASONS, Rejected, check_record, to_record

LIMITS = ValidationConfig(max_atoms=10, min_distance=0.5, max_abs_energy_per_atom=50.0,
                          max_force=20.0, max_abs_stress=1.0)
SRC = SourceConfig(path="x", dataset="d", fidelity="PBE", energy_key="REF_energy",
                   forces_key="REF_forces", stress_key="REF_stress", extras=["magmoms"])


def good_frame(n=4, periodic=True) -> RawFrame:
    rng = np.random.default_rng(0)
    pos = np.array([[0, 0, 0], [1.5, 0, 0], [0, 1.5, 0], [0, 0, 1.5]], float)[:n]
    return RawFrame(
        numbers=np.array([29, 29, 13, 13][:n]), positions=pos,
        cell=np.eye(3) * 3.0 if periodic else np.zeros((3, 3)), pbc=np.array([periodic] * 3),
        info={"REF_energy": -12.5, "REF_stress": rng.normal(0, 0.01, 6)},
        arrays={"REF_forces": rng.normal(0, 0.1, (n, 3))},
    )


def reason_of(frame, src=SRC, limits=LIMITS) -> str | None:
    try:
        check_record(to_record(frame, src, "f#0"), limits, src.allow_missing_energy)
    except Rejected as err:
        return err.reason
    return None


def test_good_frames_pass():
    assert reason_of(good_frame()) is None
    assert reason_of(good_frame(periodic=False)) is None


def _mutate(**changes):
    frame = good_frame()
    for key, value in changes.items():
        if key in ("numbers", "positions", "cell", "pbc"):
            setattr(frame, key, value)
        elif key == "REF_forces":
            frame.arrays[key] = value
        else:
            frame.info[key] = value
    return frame


CASES = {
    "unparseable_value": _mutate(REF_energy="-12.x5"),
    "bad_shape": _mutate(REF_forces=np.zeros((3, 3))),
    "empty": RawFrame(numbers=np.zeros(0, int), positions=np.zeros((0, 3)), cell=np.eye(3) * 3,
                      pbc=np.ones(3, bool), info={"REF_energy": 0.0}),
    "too_many_atoms": RawFrame(numbers=np.full(11, 1), positions=np.arange(33.0).reshape(11, 3) * 2,
                               cell=np.zeros((3, 3)), pbc=np.zeros(3, bool), info={"REF_energy": -1.0}),
    "bad_atomic_number": _mutate(numbers=np.array([29, 0, 13, 13])),
    "non_finite_positions": _mutate(positions=np.array([[0, 0, 0], [np.nan, 0, 0], [0, 1.5, 0], [0, 0, 1.5]])),
    "non_finite_cell": _mutate(cell=np.diag([3.0, np.inf, 3.0])),
    "degenerate_cell": _mutate(cell=np.array([[3.0, 0, 0], [6.0, 0, 0], [0, 0, 3.0]])),
    "atoms_too_close": _mutate(positions=np.array([[0, 0, 0], [0.3, 0, 0], [0, 1.5, 0], [0, 0, 1.5]])),
    "missing_energy": _mutate(REF_energy=None),
    "non_finite_energy": _mutate(REF_energy=float("nan")),
    "non_finite_forces": _mutate(REF_forces=np.full((4, 3), np.inf)),
    "non_finite_stress": _mutate(REF_stress=np.array([0, 0, np.nan, 0, 0, 0])),
    "non_finite_extras": _mutate(magmoms=np.array([0.0, np.nan, 0.0, 0.0])),
    "energy_outlier": _mutate(REF_energy=-4 * 51.0),
    "force_outlier": _mutate(REF_forces=np.array([[25.0, 0, 0]] * 4)),
    "stress_outlier": _mutate(REF_stress=np.array([2.0, 0, 0, 0, 0, 0])),
    "bad_charge": _mutate(charge=1.5),
    "bad_spin": _mutate(spin=-2),
    "coordinate_outlier": _mutate(positions=np.array([[0, 0, 0], [1e30, 0, 0], [0, 1.5, 0], [0, 0, 1.5]])),
    "asymmetric_stress": _mutate(REF_stress=np.array([[0.01, 0.1, 0], [-0.1, 0.02, 0], [0, 0, 0.03]])),
}


@pytest.mark.parametrize("reason", sorted(CASES))
def test_each_reason(reason):
    frame = CASES[reason]
    if reason == "missing_energy":
        del frame.info["REF_energy"]
    assert reason_of(frame) == reason


def test_every_frame_level_reason_is_covered():
    # parse_error and unreadable_frame come from readers: tested in test_build/test_sources;
    # reference_outlier from the build's reference audit: tested in test_audit; duplicate and
    # label_conflict from the duplicate join: tested in test_duplicates
    assert set(REASONS) - set(CASES) == {"parse_error", "unreadable_frame", "reference_outlier",
                                         "duplicate", "label_conflict"}


def test_periodic_image_too_close_only_under_pbc():
    # one atom in a 0.4 A cell sees its own image at 0.4 A; with no pbc it is alone
    frame = RawFrame(numbers=np.array([1]), positions=np.zeros((1, 3)), cell=np.diag([0.4, 5, 5]),
                     pbc=np.array([True, False, False]), info={"REF_energy": -1.0})
    assert reason_of(frame) == "atoms_too_close"
    frame.pbc = np.array([False, True, True])
    assert reason_of(frame) is None


def test_force_only_data_when_allowed():
    frame = good_frame()
    del frame.info["REF_energy"]
    src = SourceConfig(**{**SRC.__dict__, "allow_missing_energy": True})
    assert reason_of(frame, src) is None


def test_stress_forms_and_calculator_results():
    frame = good_frame()
    full = np.array([[1, 6, 5], [6, 2, 4], [5, 4, 3]], float) * 1e-3
    frame.info["REF_stress"] = full.ravel()
    rec = to_record(frame, SRC, "f#0")
    np.testing.assert_allclose(rec.stress, np.array([1, 2, 3, 4, 5, 6]) * 1e-3, rtol=1e-6)
    calc_src = SourceConfig(path="x", dataset="d", fidelity="PBE")
    frame.calc = {"energy": -3.0, "forces": np.zeros((4, 3)), "stress": np.zeros(6)}
    rec = to_record(frame, calc_src, "f#0")
    assert rec.energy == -3.0 and rec.stress.shape == (6,)


@pytest.mark.parametrize("seed", range(6))
def test_min_distance_halo_path_matches_vesin(seed):
    """The k-d tree + halo check agrees with a full periodic neighbour list (vesin)."""
    from data_pipeline.build.validate import _min_distance_vesin, min_pair_distance
    from data_pipeline.schema import AtomsRecord

    rng = np.random.default_rng(seed)
    for _ in range(40):
        n = int(rng.integers(1, 40))
        cell = np.diag(rng.uniform(2.0, 8.0, 3)) + rng.normal(0, 1.0, (3, 3))  # triclinic
        pbc = rng.random(3) < 0.7
        frac = rng.random((n, 3)) * (1 + 2 * rng.random())  # some atoms outside the cell
        rec = AtomsRecord(numbers=np.ones(n, np.uint8), positions=frac @ cell, cell=cell, pbc=pbc)
        cutoff = float(rng.uniform(0.3, 1.5))
        fast, ref = min_pair_distance(rec, cutoff), _min_distance_vesin(rec, cutoff)
        assert (fast is None) == (ref is None), (fast, ref)
        if ref is not None:
            assert fast == pytest.approx(ref, abs=1e-9)


@pytest.mark.parametrize("pbc", [(True, True, False), (True, False, False), (False, True, True)])
def test_slab_and_wire_with_zero_open_vectors(pbc):
    """A slab/wire may have zero cell vectors along its open directions: not degenerate."""
    from data_pipeline.build.validate import _min_distance_vesin, min_pair_distance
    from data_pipeline.schema import AtomsRecord

    pbc = np.array(pbc)
    cell = np.where(pbc[:, None], np.array([[3.0, 0, 0], [1.0, 2.9, 0], [0.5, 0.3, 3.1]]), 0.0)
    rng = np.random.default_rng(1)
    pos = rng.random((6, 3)) * 3
    frame = RawFrame(numbers=np.full(6, 29), positions=pos, cell=cell, pbc=pbc, info={"REF_energy": -1.0})
    reason = reason_of(frame, SourceConfig(path="x", dataset="d", fidelity="PBE", energy_key="REF_energy"),
                       ValidationConfig(min_distance=0.1))
    assert reason is None
    rec = AtomsRecord(numbers=np.ones(6, np.uint8), positions=pos, cell=cell, pbc=pbc)
    for cutoff in (0.8, 1.5, 2.5):
        fast, ref = min_pair_distance(rec, cutoff), _min_distance_vesin(rec, cutoff)
        assert (fast is None) == (ref is None) and (ref is None or fast == pytest.approx(ref))


@pytest.mark.parametrize("units, energy, force, stress", [
    ({}, -12.5, 1.0, 1.0),
    ({"energy_unit": "hartree"}, -12.5 * 27.211386, 27.211386, 1.0),
    ({"energy_unit": "hartree", "forces_unit": "hartree/bohr"}, -12.5 * 27.211386, 51.422067, 1.0),
    ({"energy_unit": "kcal/mol"}, -12.5 * 0.0433641, 0.0433641, 1.0),
    ({"energy_unit": "kJ/mol", "forces_unit": "eV/A"}, -12.5 * 0.01036427, 1.0, 1.0),
    ({"stress_unit": "GPa"}, -12.5, 1.0, 1 / 160.21766),
    ({"stress_unit": "kbar", "stress_sign": "vasp"}, -12.5, 1.0, -1 / 1602.1766),
])
def test_label_units_are_converted_to_ev_and_ase_sign(units, energy, force, stress):
    import dataclasses

    frame = good_frame()
    rec = to_record(frame, dataclasses.replace(SRC, **units), "f#0")
    assert rec.energy == pytest.approx(energy, rel=1e-6)
    np.testing.assert_allclose(rec.forces, frame.arrays["REF_forces"] * force, rtol=1e-6)
    np.testing.assert_allclose(rec.stress, frame.info["REF_stress"] * stress, rtol=1e-6)


def test_bad_forces_unit_names_the_key_and_the_choices():
    from common.config import ConfigError

    with pytest.raises(ConfigError, match=r"forces_unit: got 'hartree/nm'.*hartree/bohr"):
        SourceConfig(path="x", dataset="d", fidelity="PBE", forces_unit="hartree/nm").validate()


def test_extras_by_key_or_declaration():
    """A plain-string extra is kept under its key, as read; a declared one is renamed,
    its layout checked and its values converted; an absent one is simply absent."""
    frame = good_frame()
    frame.arrays["magmoms"] = np.array([1, 0, 2, 0])  # ints: a known quantity is stored as float64
    frame.arrays["flags"] = np.array([1, 0, 1, 1])
    frame.info["dip"] = np.array([1.0, 0.0, -2.0])
    src = dataclasses.replace(SRC, extras=["magmoms", "flags", "absent",
                                           ExtraConfig(key="dip", name="dipole", unit="e*bohr")])
    rec = to_record(frame, src, "f#0")
    assert sorted(rec.extras) == ["dipole", "flags", "magmoms"]
    assert rec.extras["magmoms"].dtype == np.float64 and rec.extras["flags"].dtype.kind == "i"
    np.testing.assert_allclose(rec.extras["dipole"], [0.529177, 0.0, -1.058354], rtol=1e-6)
    frame.info["dip"] = np.zeros(4)
    with pytest.raises(Rejected, match=r"bad_shape: extra 'dip' \(dipole, per structure\) has shape \(4,\), "
                                       r"expected \(3,\)"):
        to_record(frame, src, "f#0")


def _screen_case(rng, limits):
    """A random record near the limits: triclinic, slab or cluster, pairs and images at
    the distance bound, forces and stress at theirs, an occasional NaN."""
    from data_pipeline.schema import AtomsRecord

    n = int(rng.integers(1, 24))
    kind = int(rng.integers(0, 3))  # periodic, cluster, slab
    cell = np.diag(rng.uniform(0.8, 7.0, 3)) + rng.normal(0, 0.8, (3, 3))
    pbc = np.array([True, True, True] if kind == 0 else [False] * 3 if kind == 1 else [True, True, False])
    pos = (rng.random((n, 3)) * (1 + rng.random())) @ cell
    if n > 1 and rng.random() < 0.5:  # a pair (or a pair across a face) at the bound
        u = rng.normal(size=3)
        d = limits.min_distance * (1 + rng.choice([-1e-9, 0.0, 1e-9, 1e-7, 1e-3]))
        pos[1] = pos[0] + d * u / np.linalg.norm(u) + (cell[int(rng.integers(3))] if rng.random() < 0.5 else 0)
    forces = rng.normal(0, 1, (n, 3)).astype(np.float32)
    if rng.random() < 0.3:
        forces[0] = [limits.max_force * (1 + rng.choice([-1e-6, -1e-8, 0, 1e-8])), 0, 0]
    stress = rng.normal(0, 0.1, 6).astype(np.float32)
    if rng.random() < 0.2:
        stress[int(rng.integers(6))] = limits.max_abs_stress * rng.choice([1.0, -1.0, 1.0001])
    if rng.random() < 0.1:
        (pos if rng.random() < 0.5 else forces)[0, 0] = rng.choice([np.nan, np.inf])
    return AtomsRecord(numbers=rng.integers(1, 30, n), positions=pos, cell=cell, pbc=pbc,
                       energy=float(rng.normal() * 10 * n), forces=forces, stress=stress)


@pytest.mark.parametrize("seed", range(4))
def test_screen_passes_only_records_the_full_checks_pass(seed):
    """clearly_valid is a conservative shortcut: a record it passes meets every check,
    screened alone or in a batch of mixed records (the build's way), with equal answers."""
    from data_pipeline.build.screen import clearly_valid, clearly_valid_many
    from data_pipeline.build.validate import check_fully

    rng = np.random.default_rng(seed)
    limits = ValidationConfig(max_atoms=20, min_distance=float(rng.uniform(0.3, 1.2)),
                              max_abs_energy_per_atom=20.0, max_force=3.0, max_abs_stress=0.3)
    recs = [_screen_case(rng, limits) for _ in range(400)]
    if seed % 2:  # records without forces or stress, and an empty one, in the same batch
        for rec in recs[::7]:
            rec.forces = None
        for rec in recs[3::5]:
            rec.stress = None
        recs[5] = dataclasses.replace(recs[5], numbers=np.zeros(0, int), positions=np.zeros((0, 3)),
                                      forces=None)
    batch = clearly_valid_many(recs, limits)
    passed = rejected = 0
    for rec, screened in zip(recs, batch):
        try:
            check_fully(rec, limits, False)
            reason = None
        except Rejected as err:
            reason = err.reason
            rejected += 1
        assert screened == clearly_valid(rec, limits)
        if screened:
            assert reason is None, (reason, rec)
            passed += 1
    assert passed > 20 and rejected > 20  # both sides were exercised
    for size in (1, 2, 33):  # any batch split gives the same answers
        parts = [clearly_valid_many(recs[i:i + size], limits) for i in range(0, len(recs), size)]
        np.testing.assert_array_equal(np.concatenate(parts), batch)


def test_screen_takes_plain_good_records():
    """The screen passes the common case (else it would only cost time)."""
    from data_pipeline.build.screen import clearly_valid
    from tests.synthetic import labelled_frames

    src = SourceConfig(path="x", dataset="d", fidelity="PBE", energy_key="REF_energy",
                       forces_key="REF_forces", stress_key="REF_stress")
    frames = labelled_frames(30, seed=3, method="linear", clusters=0.3, max_atoms=40)
    recs = [to_record(RawFrame(numbers=a.numbers, positions=a.positions, cell=a.cell.array, pbc=a.pbc,
                               info=a.info, arrays=a.arrays), src, "f#0") for a in frames]
    assert all(clearly_valid(r, ValidationConfig()) for r in recs)


@pytest.mark.parametrize("key, value, kept", [("charge", 2.0, 2), ("charge", -1, -1), ("spin", 2, 2), ("spin", 0, 0),
                                              ("spin", 3.0, 3)])
def test_whole_charges_and_multiplicities_are_kept_as_given(key, value, kept):
    rec = to_record(_mutate(**{key: value}), SRC, "f#0")
    assert getattr(rec, key) == kept


@pytest.mark.parametrize("key, value", [("charge", 1.5), ("charge", 0.999), ("spin", -2), ("spin", 2.5)])
def test_charges_and_multiplicities_are_never_rounded(key, value):
    with pytest.raises(Rejected) as err:
        to_record(_mutate(**{key: value}), SRC, "f#0")
    assert err.value.reason == f"bad_{key}" and repr(value) in str(err.value)


def test_a_nearly_symmetric_stress_keeps_both_off_diagonals():
    s = np.array([[1.0, 6.0, 5.0], [6.0 + 1e-6, 2.0, 4.0], [5.0, 4.0, 3.0]]) * 1e-3
    rec = to_record(_mutate(REF_stress=s), SRC, "f#0")
    assert rec.stress[5] == pytest.approx(6.0000005e-3, rel=1e-12)  # the mean of xy and yx


def test_the_screen_does_not_clear_a_far_atom():
    from data_pipeline.build.screen import clearly_valid

    rec = to_record(_mutate(positions=np.array([[0, 0, 0], [2e4, 0, 0], [0, 1.5, 0], [0, 0, 1.5]])), SRC, "f#0")
    assert not clearly_valid(rec, LIMITS)
    assert clearly_valid(to_record(good_frame(), SRC, "f#0"), LIMITS)
