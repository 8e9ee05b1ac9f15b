"""The main job, as README's first command runs it: ``mlip-pretrain demo`` on the shipped QM
dataset, every stage for real (Ray build, DeepSpeed pause + resume, eval on the held-out
split, release, verify, NVE MD with the release's calculator, an IR spectrum from its
dipoles): the model must have learned every fidelity and the extra targets, and the
terminal shows our lines only."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIDELITIES = ("GFN1-xTB", "GFN2-xTB", "PBE/def2-SVP", "EMT")
#: DeepSpeed's own lines, which go to the run's deepspeed.log
NOISE = ("untested optimizer", "built successfully", "Processing zero checkpoint", "Loading checkpoint shards",
         "cannot find -laio", "Setting accelerator")


def _force_rms(manifest: dict) -> dict[str, float]:
    """Atom-weighted force RMS of each fidelity of a shard folder."""
    sums: dict[str, list[float]] = {}
    for g in manifest["groups"]:
        s = sums.setdefault(g["fidelity"], [0.0, 0.0])
        s[0] += g["force_rms"] ** 2 * g["atoms"]
        s[1] += g["atoms"]
    return {f: math.sqrt(a / n) for f, (a, n) in sums.items()}


def test_demo_runs_the_whole_life_cycle_and_learns_every_fidelity(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "launch.cli", "demo", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rms = _force_rms(json.loads((out / "shards-test" / "manifest.json").read_text()))
    for where in ("eval", "release"):
        metrics = json.loads((out / where / "metrics.json").read_text())["fidelities"]
        assert sorted(metrics) == sorted(FIDELITIES), (where, sorted(metrics))
        for fid in FIDELITIES:
            m = metrics[fid]
            assert math.isfinite(m["energy_mae_per_atom"]) and math.isfinite(m["forces_mae"]), (where, fid, m)
            assert m["forces_mae"] < 0.5 * rms[fid], f"{where}: {fid} force MAE {m['forces_mae']:.3f} eV/A is not " \
                                                     f"below half the held-out force RMS {rms[fid]:.3f}"
    names = sorted(p.name for p in (out / "release").iterdir())
    assert names == ["MODEL_CARD.md", "SHA256SUMS", "config.json", "metrics.json", "model.safetensors",
                     "reliability.png", "robustness.json", "robustness.png"]
    # calibrated uncertainty, scored on the held-out half the calibration never saw
    uq = json.loads((out / "release" / "metrics.json").read_text())["uncertainty"]
    assert uq["scored"].startswith("odd positions") and sorted(uq["fidelities"]) == sorted(FIDELITIES)
    for fid in FIDELITIES:
        forces, ood = uq["fidelities"][fid]["forces"], uq["out_of_distribution"][fid]
        assert 0.85 <= forces["coverage_95"] <= 1.0, (fid, forces)
        assert forces["spearman_structure"] > 0.3, (fid, forces)  # 0.59-0.77 measured
        assert ood["unseen_ratio"] > 3, (fid, ood)  # elements the fidelity never saw: 5-21x measured
    assert "uncertainty (llpr" in r.stdout and "x unseen elements F/E" in r.stdout
    robust = json.loads((out / "release" / "robustness.json").read_text())
    assert sorted(robust["fidelities"]) == sorted(FIDELITIES), robust
    for fid, checks in robust["fidelities"].items():  # what the repulsion prior guarantees
        assert checks["dimers"]["passed"] and checks["dimers"]["cases"] >= 10, (fid, checks["dimers"])
    emt = robust["fidelities"]["EMT"]["compression"]
    assert emt["passed"] and emt["cases"] == 7, emt  # the covered metals' crystals, 2 -> 0.35 V0
    assert "robustness of the release" in r.stdout
    # what the data holds: the build's duplicate report, and the held-out split's overlap with training
    dups = json.loads((out / "shards-train" / "manifest.json").read_text())["duplicates"]
    assert sorted(dups["fidelities"]) == sorted(FIDELITIES)
    leak = json.loads((out / "release" / "metrics.json").read_text())["leakage"]
    assert sum(c["records"] for c in leak["fidelities"].values()) == leak["eval"]["records"]
    assert "training data: exact/near copies" in r.stdout and "held-out structures also in training" in r.stdout
    assert "training data coverage per fidelity" in r.stdout and "held-out force MAE by element" in r.stdout
    card = (out / "release" / "MODEL_CARD.md").read_text()
    if robust["passed"]:
        assert ": pass" in r.stdout and "fragile" not in card
    else:  # a fragile release says so and names what failed: in the card and the summary
        assert "The release is fragile" in card and "failed:" in r.stdout and "(verified, fragile)" in r.stdout
    assert any(p.name.startswith("parity-") for p in (out / "eval").iterdir())
    # more than energies: charges and dipoles learned at the molecular fidelities, better than
    # predicting the mean label, listed on the card, and an IR spectrum from the release's dipoles
    targets = json.loads((out / "release" / "metrics.json").read_text())["targets"]
    for name in ("charges", "dipole"):
        assert sorted(targets[name]["fidelities"]) == sorted(FIDELITIES[:3]), targets[name]
        for fid, m in targets[name]["fidelities"].items():
            assert m["rmse"] < 0.8 * m["ref_std"], (name, fid, m)  # 0.23-0.61 measured
    assert (out / "eval" / "parity-dipole.png").is_file() and "## Extra targets" in card
    assert "held-out extra targets" in r.stdout and "IR of held-out g2-C2H4 at GFN2-xTB" in r.stdout
    ir = json.loads((out / "ir" / "ir-g2-C2H4.gfn2.json").read_text())
    assert len(ir["md_vs_reference"]) == 4 and (out / "ir" / "ir-g2-C2H4.gfn2.png").is_file()  # its 4 IR-active modes
    assert "resumed from" in r.stdout and "MD: 200 NVE steps" in r.stdout
    # what the cheap fidelities bought the DFT one: a control on the DFT records alone, same
    # steps and DFT atoms seen
    assert "multi-fidelity: PBE/def2-SVP held-out force MAE" in r.stdout
    seen = [next(json.loads(ln)["data/atoms_seen/PBE/def2-SVP"] for ln in reversed(
        (out / run / "metrics.jsonl").read_text().splitlines()) if "data/atoms_seen" in ln)
        for run in ("train", "train-dft-only")]
    assert abs(seen[1] / seen[0] - 1) < 0.1, seen
    assert "- Delta head: PBE/def2-SVP is learned as a correction to GFN2-xTB's" in card
    shown = r.stdout + r.stderr
    assert not [n for n in NOISE if n in shown], [n for n in NOISE if n in shown]
    assert "untested optimizer" in (out / "train" / "deepspeed.log").read_text()  # there, not on the terminal
