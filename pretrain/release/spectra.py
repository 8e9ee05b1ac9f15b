"""An infrared spectrum from a release: the dipole autocorrelation of NVE molecular dynamics,
compared with the reference code's harmonic frequencies at the same level of theory.

``mlip-pretrain release ir RELEASE REFERENCE.json --out DIR``. The reference file
(``data/qm/test/ir/*.json``, written by the dataset's generator) holds a molecule relaxed
by the reference code, its harmonic frequencies and IR intensities, and the fidelity
they were computed at; the release is served at that fidelity and must have a dipole
target there (``models/properties.py``).

Steps, all with the release:

1. relax the reference geometry (BFGS, ``fmax`` 1e-3 eV/A);
2. harmonic frequencies and IR intensities by central differences of forces and dipoles
   (ASE's ``Infrared``): the model's own harmonic spectrum, which separates the model's
   error from the anharmonicity the MD adds;
3. ``runs`` trajectories: Maxwell-Boltzmann velocities at ``temperature``, Langevin to
   equilibrate, then NVE (velocity Verlet) recording the dipole every step, from the same
   forward pass as the forces (no extra model call);
4. the spectrum ``I(w) ~ |FT[dmu/dt]|^2``, averaged over runs and Cartesian components
   (the dipole-derivative autocorrelation by Wiener-Khinchin, Hann-windowed): this is
   ``w^2`` times the dipole autocorrelation's spectrum, the classical absorption line shape
   without the refractive index;
5. its peaks (local maxima above 5% of the largest), each reference IR-active mode
   matched to the nearest peak, and to the nearest model-harmonic active mode, within
   20% of the mode (100-400 cm^-1; farther: missed, reported as such).

Resolution is ``1 / (steps * timestep)``: 2,000 steps of 0.5 fs resolve 33 cm^-1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.errors import UserError

CM1_PER_INV_FS = 1e15 / 2.99792458e10  # a frequency of 1 / fs in wavenumbers (cm^-1)
ACTIVE_FRACTION = 0.01  # a mode is IR-active above this fraction of the strongest intensity
PEAK_FRACTION = 0.05  # a spectral peak rises above this fraction of the spectrum's maximum
MIN_WAVENUMBER = 100.0  # rotations and drift below this are not vibrational peaks


class SpectrumError(UserError, ValueError):
    """The release cannot give this spectrum; the message says why and what to do."""


def read_reference(path: str | Path) -> dict:
    """The reference file: ``mol_id``, ``fidelity``, ``numbers``, ``positions_A``,
    ``frequencies_cm1`` and ``ir_intensities_km_mol``; errors name the file and the key."""
    path = Path(path)
    try:
        ref = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SpectrumError(f"{path}: not a readable JSON reference spectrum ({err})") from None
    for key in ("fidelity", "numbers", "positions_A", "frequencies_cm1", "ir_intensities_km_mol"):
        if key not in ref:
            raise SpectrumError(f"{path}: no {key!r}; a reference spectrum file of data/qm/test/ir is expected")
    return ref


def active_modes(frequencies, intensities, floor: float = MIN_WAVENUMBER) -> list[tuple[float, float]]:
    """``[(wavenumber, relative intensity)]`` of the IR-active vibrational modes: real,
    above ``floor`` cm^-1 (not rotations), intensity above :data:`ACTIVE_FRACTION` of the
    strongest; degenerate modes (within 1 cm^-1) merged, intensities added."""
    f, i = np.asarray(frequencies, float), np.asarray(intensities, float)
    keep = f > floor
    f, i = f[keep], i[keep]
    if not len(f) or i.max() <= 0:
        return []
    i = i / i.max()
    modes: list[list[float]] = []
    for w, s in sorted(zip(f, i)):
        if modes and w - modes[-1][0] < 1.0:
            modes[-1][1] += s
        else:
            modes.append([w, s])
    top = max(s for _, s in modes)
    return [(float(w), float(s / top)) for w, s in modes if s / top >= ACTIVE_FRACTION]


def dipole_spectrum(dipoles: list[np.ndarray], timestep_fs: float) -> tuple[np.ndarray, np.ndarray]:
    """``(wavenumbers cm^-1, intensity normalised to max 1)`` of dipole series ``[T, 3]``
    (one per run): ``|FT[dmu/dt]|^2`` with a Hann window, averaged."""
    total = None
    for mu in dipoles:
        rate = np.diff(np.asarray(mu, float), axis=0) / timestep_fs  # [T-1, 3]
        rate = rate - rate.mean(axis=0)
        window = np.hanning(len(rate))[:, None]
        power = (np.abs(np.fft.rfft(rate * window, axis=0)) ** 2).sum(axis=1)
        total = power if total is None else total + power[:len(total)]
    n = len(dipoles[0]) - 1
    wavenumbers = np.fft.rfftfreq(n, d=timestep_fs)[:len(total)] * CM1_PER_INV_FS
    return wavenumbers, total / max(total.max(), 1e-300)


def spectrum_peaks(wavenumbers: np.ndarray, intensity: np.ndarray) -> list[tuple[float, float]]:
    """``[(wavenumber, height)]`` of the local maxima above :data:`PEAK_FRACTION` (the peak
    position refined by a parabola through its three points)."""
    from scipy.signal import find_peaks  # noqa: PLC0415

    keep = wavenumbers > MIN_WAVENUMBER
    idx, _ = find_peaks(np.where(keep, intensity, 0.0), height=PEAK_FRACTION * intensity[keep].max())
    out = []
    for k in idx:
        a, b, c = intensity[k - 1], intensity[k], intensity[k + 1]
        shift = 0.5 * (a - c) / (a - 2 * b + c) if (a - 2 * b + c) != 0 else 0.0
        out.append((float(wavenumbers[k] + shift * (wavenumbers[1] - wavenumbers[0])), float(b)))
    return out


def match(reference: list[tuple[float, float]], found: list[float]) -> list[dict]:
    """Each reference mode with the nearest of ``found`` (wavenumbers) within
    :func:`window` of it, and the difference; None where nothing is that close (missed)."""
    rows = []
    for w, s in reference:
        near = min(found, key=lambda x: abs(x - w)) if found else None
        if near is not None and abs(near - w) > window(w):
            near = None
        rows.append({"reference_cm1": w, "reference_intensity": s, "model_cm1": near,
                     "error_cm1": None if near is None else near - w})
    return rows


def window(wavenumber: float) -> float:
    """How far (cm^-1) a peak may be from a reference mode and still be its match: 20% of
    the mode, at least 100 cm^-1 (a tiny model's errors) and at most 400 (past that it is
    another mode)."""
    return min(max(0.2 * wavenumber, 100.0), 400.0)


def _molecule(ref: dict):
    from ase import Atoms  # noqa: PLC0415

    atoms = Atoms(numbers=ref["numbers"], positions=ref["positions_A"])
    atoms.info.update(charge=int(ref.get("charge", 0)), spin=int(ref.get("spin", 1)))
    return atoms


def harmonic(calc, atoms, workdir: Path, delta: float = 0.01) -> list[tuple[float, float]]:
    """The model's IR-active harmonic modes at ``atoms`` (relaxed): ASE ``Infrared`` with
    central differences of ``delta`` A, forces and dipoles from ``calc``."""
    from ase.vibrations import Infrared  # noqa: PLC0415

    atoms = atoms.copy()
    atoms.calc = calc
    ir = Infrared(atoms, name=str(workdir / "ir-cache"), delta=delta, nfree=2)
    ir.clean()
    ir.run()
    freqs = np.real(ir.get_frequencies())
    intensities = np.asarray(ir.intensities, float)
    ir.clean()
    import shutil  # noqa: PLC0415

    shutil.rmtree(workdir / "ir-cache", ignore_errors=True)
    return active_modes(freqs, intensities)


def md_dipoles(calc, atoms, temperature: float, timestep_fs: float, steps: int, equilibrate: int,
               seed: int) -> np.ndarray:
    """Dipole ``[steps + 1, 3]`` (e*A) of one NVE run after a Langevin equilibration."""
    from ase import units  # noqa: PLC0415
    from ase.md.langevin import Langevin  # noqa: PLC0415
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation  # noqa: PLC0415
    from ase.md.verlet import VelocityVerlet  # noqa: PLC0415

    atoms = atoms.copy()
    atoms.calc = calc
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    Stationary(atoms)
    ZeroRotation(atoms)
    Langevin(atoms, timestep_fs * units.fs, temperature_K=temperature, friction=0.01 / units.fs,
             fixcm=False, rng=rng).run(equilibrate)
    Stationary(atoms)
    ZeroRotation(atoms)  # a rotating molecule's dipole turns: a line at the rotation frequency
    dyn = VelocityVerlet(atoms, timestep_fs * units.fs)
    dipoles = [atoms.get_dipole_moment()]
    for _ in range(steps):
        dyn.run(1)
        dipoles.append(atoms.get_dipole_moment())  # cached from the step's force call
    return np.array(dipoles)


def ir_spectrum(release: str | Path, reference: str | Path, out: str | Path, temperature: float = 150.0,
                timestep_fs: float = 0.5, steps: int = 2000, equilibrate: int = 200, runs: int = 2,
                seed: int = 0, progress: bool = True) -> dict:
    """The IR comparison of ``release`` with ``reference`` (see the module docstring):
    writes ``<out>/ir-<reference name>.json`` and ``.png``, returns the JSON's dict."""
    from ase.optimize import BFGS  # noqa: PLC0415

    from common.progress import Progress  # noqa: PLC0415
    from pretrain.release.calculator import MLIPCalculator  # noqa: PLC0415

    ref = read_reference(reference)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    calc = MLIPCalculator.from_release(release, ref["fidelity"], coverage="warn")
    if "dipole" not in calc.implemented_properties:
        raise SpectrumError(f"{release}: no dipole target trained at {ref['fidelity']!r}; train one "
                            "(model.targets kind dipole) or pick a reference at a fidelity that has it")
    atoms = _molecule(ref)
    atoms.calc = calc
    BFGS(atoms, logfile=None).run(fmax=1e-3, steps=500)
    relaxed = atoms.copy()
    model_harmonic = harmonic(calc, relaxed, out)
    reference_modes = active_modes(ref["frequencies_cm1"], ref["ir_intensities_km_mol"])
    series = []
    with Progress(runs * (steps + equilibrate), "ir md", unit="steps", enabled=progress) as bar:
        for k in range(runs):
            series.append(md_dipoles(calc, relaxed, temperature, timestep_fs, steps, equilibrate, seed + k))
            bar.update(steps + equilibrate)
    wavenumbers, intensity = dipole_spectrum(series, timestep_fs)
    peaks = spectrum_peaks(wavenumbers, intensity)
    result = {
        "mol_id": ref.get("mol_id"), "fidelity": ref["fidelity"], "release": Path(release).name,
        "reference": {"file": Path(reference).name, "code": ref.get("code"), "active_modes": reference_modes},
        "md": {"temperature_K": temperature, "timestep_fs": timestep_fs, "steps": steps,
               "equilibrate_steps": equilibrate, "runs": runs, "seed": seed,
               "resolution_cm1": float(wavenumbers[1] - wavenumbers[0]), "peaks": peaks},
        "model_harmonic": model_harmonic,
        "md_vs_reference": match(reference_modes, [w for w, _ in peaks]),
        "harmonic_vs_reference": match(reference_modes, [w for w, _ in model_harmonic]),
    }
    for key, rows in (("md_peak", result["md_vs_reference"]), ("harmonic", result["harmonic_vs_reference"])):
        errors = [abs(r["error_cm1"]) for r in rows if r["error_cm1"] is not None]
        result[f"{key}_mae_cm1"] = float(np.mean(errors)) if errors else None
        result[f"{key}_missed"] = len(rows) - len(errors)
    name = f"ir-{_slug(Path(reference).stem)}"  # the reference's name: molecule and level
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    _plot(wavenumbers, intensity, result, out / f"{name}.png")
    return result


def summary_line(result: dict) -> str:
    """One line: the reference modes against the MD peaks and the model's harmonic modes."""
    def cm(x):
        return "-" if x is None else f"{x:.0f}"
    pairs = ", ".join(f"{cm(r['reference_cm1'])} -> {cm(r['model_cm1'])} (MD) / {cm(h['model_cm1'])} (harmonic)"
                      for r, h in zip(result["md_vs_reference"], result["harmonic_vs_reference"]))
    return (f"IR of held-out {result['mol_id']} at {result['fidelity']}, reference harmonic -> release, cm^-1: "
            f"{pairs}; mean |error| MD peaks {cm(result['md_peak_mae_cm1'])} ({result['md_peak_missed']} missed), "
            f"harmonic {cm(result['harmonic_mae_cm1'])} ({result['harmonic_missed']} missed) cm^-1 "
            f"(resolution {result['md']['resolution_cm1']:.0f}; '-': no peak within 20%)")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _plot(wavenumbers, intensity, result: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    top = max([w for w, _ in result["reference"]["active_modes"]] + [1000.0]) * 1.25
    keep = wavenumbers <= top
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(wavenumbers[keep], intensity[keep], color="C0", lw=1.2, label="release: NVE dipole autocorrelation")
    for k, (w, s) in enumerate(result["reference"]["active_modes"]):
        ax.vlines(w, 0, s, color="C3", lw=2, label="reference harmonic" if k == 0 else None)
    for k, (w, s) in enumerate(result["model_harmonic"]):
        ax.vlines(w, 0, -0.3 * s, color="C2", lw=2, label="release harmonic (below axis)" if k == 0 else None)
    ax.axhline(0, color="0.5", lw=0.8)
    md = result["md"]
    ax.set(xlabel="wavenumber (cm$^{-1}$)", ylabel="intensity (normalised)",
           title=f"{result['mol_id']} at {result['fidelity']}: {md['runs']} x {md['steps']} NVE steps of "
                 f"{md['timestep_fs']} fs at {md['temperature_K']:g} K")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
