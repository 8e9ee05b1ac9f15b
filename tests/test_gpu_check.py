"""python -m benchmarks.gpu_check runs end to end on CPU: every GPU part skipped with its reason,
the CPU parts measured, one JSON with the issue's keys; and its pieces (interval union,
peak table) compute what they say."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.device_measures import union_length
from benchmarks.gpu_report import evaluate_targets, peak_tflops

REPO = Path(__file__).resolve().parents[1]
TINY = {"family": "mace", "cutoff": 4.0, "channels": 8, "hidden": 8, "lmax": 2,
        "hidden_lmax": 1, "correlation": 2, "layers": 2, "avg_neighbors": 10.0}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    config = tmp / "mace-tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp / "result.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--quick", "--models",
                           str(config), "--out", str(out), "--work", str(tmp / "work"),
                           "--budget", "240"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_cpu_run_skips_gpu_parts_with_reasons(quick_run):
    res, stdout = quick_run
    if res["probe"]["cuda_available"]:
        pytest.skip("this machine has a CUDA device: the CPU-only skips do not apply")
    parts = res["parts"]
    assert set(parts) == {"setup", "gpu_tests", "physics_cuda", "bf16_forces", "throughput"}
    for name in ("gpu_tests", "physics_cuda"):
        assert parts[name]["status"] == "skipped" and "no CUDA" in parts[name]["reason"]
    assert parts["setup"]["peer"] == {"status": "skipped", "reason": "--no-peer"}
    rows = parts["throughput"]["rows"]
    assert "CUDA" in rows["mace-tiny fp32 cueq"]["reason"]
    assert rows["mace-tiny bf16 torch"]["status"] == "skipped"
    assert "no CUDA" in rows["mace-tiny fp32 torch"]["measures"]["cuda_measures"]
    assert all(v.startswith("not measured") for v in res["targets"].values())
    assert "| mace-tiny fp32 torch |" in stdout and "Targets:" in stdout


def test_cpu_run_measures_cpu_parts(quick_run):
    res, _ = quick_run
    row = res["parts"]["throughput"]["rows"]["mace-tiny fp32 torch"]
    assert row["status"] == "ok" and row["atoms_per_s"] > 0 and row["atoms"] == 32
    assert row["measures"]["flops_per_step"] > 0  # counted as models/info.py counts
    bf16 = res["parts"]["bf16_forces"]
    assert bf16["status"] == "ok" and bf16["device"] == res["probe"].get("device", "cpu")
    m = bf16["models"]["mace-tiny"]
    assert math.isfinite(m["force_rel_rms"]) and 0 < m["force_rel_rms"]  # bf16 != fp32
    assert m["force_rms_fp32"] > 0
    assert res["settings"]["models"] and res["dataset"]["atoms"] == 32 and res["total_s"] < 240


def test_union_length_counts_overlaps_once():
    assert union_length([]) == 0
    assert union_length([(0, 2), (1, 3), (5, 6), (5.5, 5.8)]) == 4
    assert union_length([(4, 5), (0, 10)]) == 10


def test_peak_table_and_targets():
    h200 = {"device": {"name": "NVIDIA H200", "tf32_matmul": False}}
    assert peak_tflops(h200, "bf16") == (989.5, "H200 bf16 dense")
    assert peak_tflops(h200, "fp32")[0] == 67.0
    assert peak_tflops({"device": {"name": "NVIDIA A100-SXM4-80GB", "tf32_matmul": True}},
                       "fp32") == (156.0, "A100 tf32 dense")
    assert peak_tflops({}, "fp32")[0] is None
    row = {"status": "ok", "atoms_per_s": 300.0, "params": 1, "step_s": [1.0],
           "measures": {"flops_per_step": 1e12, "host_syncs": {"per_step": 3.0},
                        "gpu_busy": {"fraction": 0.8}}}
    res = {"probe": h200, "settings": {"models": ["mace-s"]}, "parts": {"throughput": {"rows": {
        "mace-s bf16 torch": row, "mace-torch-s bf16 cueq": row | {"atoms_per_s": 100.0}}}}}
    t = evaluate_targets(res)
    assert t["mace-s bf16 >= 1.5x mace-torch + cuEquivariance"] == "met: 3.00x"
    assert t["host syncs per step <= 5"] == "met: at most 3"
    assert t["GPU busy >= 90%"] == "NOT met: best 80.0%"
    assert t["mace-s fp32 >= 1.5x mace-torch + cuEquivariance"].startswith("not measured")
