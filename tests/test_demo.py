"""The main job, as README's first command runs it: ``mlip-pretrain demo --quick`` on the
shipped QM dataset, every stage for real (Ray build, DeepSpeed pause + resume, eval on the
held-out split, release, verify, NVE MD with the release's calculator)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_quick_runs_the_whole_life_cycle(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "launch.cli", "demo", "--quick", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = r.stdout
    for needle in ("held-out test split, per fidelity", "PBE/def2-SVP", "GFN1-xTB", "GFN2-xTB", "EMT",
                   "MD: 200 NVE steps", "release:", "open the MLflow UI:", "resumed from"):
        assert needle in text, needle
    names = sorted(p.name for p in (out / "release").iterdir())
    assert names == ["MODEL_CARD.md", "SHA256SUMS", "config.json", "metrics.json", "model.safetensors"]
    assert any(p.name.startswith("parity-") for p in (out / "eval").iterdir())
