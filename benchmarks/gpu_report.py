"""``gpu_check.py``'s reading of its results: vendor peak FLOP rates, the targets, the table.

Peak rates are NVIDIA's datasheet figures in TFLOP/s, dense (the datasheets' tensor-core
numbers are quoted "with sparsity": half of those). fp32 rows are compared with the plain
FP32 figure, since torch runs fp32 matmuls without TF32 unless told
(``torch.backends.cuda.matmul.allow_tf32``, recorded by the probe), else with TF32.
"""

from __future__ import annotations

from pathlib import Path

# (substring of torch's device name, {math: dense TFLOP/s}); the first match wins
PEAK_TFLOPS = [
    ("H200 NVL", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.5, "tf32": 494.7, "fp32": 67.0}),
    ("H100 NVL", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.5, "tf32": 494.7, "fp32": 67.0}),  # SXM ("H100 80GB HBM3")
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]
TARGETS = {"speedup": 1.5, "host_syncs": 5, "gpu_busy": 0.9}


def peak_tflops(probe: dict, precision: str) -> tuple[float | None, str]:
    """The vendor peak for this device and precision, and which figure it is."""
    dev = probe.get("device")
    if not dev:
        return None, "no GPU (no peak table for CPUs)"
    math = "bf16" if precision == "bf16" else ("tf32" if dev.get("tf32_matmul") else "fp32")
    for key, peaks in PEAK_TFLOPS:
        if key in dev["name"]:
            return peaks[math], f"{key} {math} dense"
    return None, f"{dev['name']} is not in the peak table (benchmarks/gpu_report.py)"


def row_figures(row: dict, probe: dict, precision: str) -> dict:
    """atoms/s, TFLOP/s achieved and its share of peak, syncs, busy, memory of one row."""
    m = row.get("measures", {})
    step_s = sorted(row["step_s"])[len(row["step_s"]) // 2]
    flops = m.get("flops_per_step")
    tflops = flops / step_s / 1e12 if isinstance(flops, float) else None
    peak, which = peak_tflops(probe, precision)
    return {"atoms_per_s": row["atoms_per_s"], "params": row["params"], "step_s": step_s,
            "tflops": tflops, "peak_share": tflops / peak if peak and tflops else None,
            "peak": which if tflops is not None else str(flops),
            "syncs": m.get("host_syncs", {}).get("per_step"),
            "busy": m.get("gpu_busy", {}).get("fraction"),
            "memory": (m["peak_memory_gib"] / m["device_memory_gib"]
                       if "peak_memory_gib" in m else None),
            "other_cpu_s": row.get("other_cpu_s"), "seconds": row.get("seconds")}


def evaluate_targets(res: dict) -> dict:
    """The issue's three targets: met, not met, or not measured (why)."""
    rows = res["parts"]["throughput"].get("rows", {})
    ok = {k: row_figures(r, res["probe"], k.split()[1]) for k, r in rows.items()
          if r.get("status") == "ok"}
    out = {}
    for prec in ("fp32", "bf16"):
        for size in [Path(m).stem.split("-", 1)[1] for m in res["settings"]["models"]
                     if Path(m).stem.startswith("mace-")]:
            ours = [v["atoms_per_s"] for k, v in ok.items()
                    if k.startswith(f"mace-{size} {prec}")]
            peer = ok.get(f"mace-torch-{size} {prec} cueq")
            name = f"mace-{size} {prec} >= {TARGETS['speedup']}x mace-torch + cuEquivariance"
            if not ours or not peer:
                why = rows.get(f"mace-torch-{size} {prec} cueq", {}).get("reason", "not run")
                out[name] = f"not measured: {'ours not run' if not ours else why}"
            else:
                x = max(ours) / peer["atoms_per_s"]
                out[name] = f"{'met' if x >= TARGETS['speedup'] else 'NOT met'}: {x:.2f}x"
    ours = {k: v for k, v in ok.items() if not k.startswith("mace-torch")}
    syncs = [v["syncs"] for v in ours.values() if v["syncs"] is not None]
    busy = [v["busy"] for v in ours.values() if v["busy"] is not None]
    out[f"host syncs per step <= {TARGETS['host_syncs']}"] = (
        f"{'met' if max(syncs) <= TARGETS['host_syncs'] else 'NOT met'}: at most {max(syncs):g}"
        if syncs else "not measured: no CUDA")
    out[f"GPU busy >= {TARGETS['gpu_busy']:.0%}"] = (
        f"{'met' if max(busy) >= TARGETS['gpu_busy'] else 'NOT met'}: best {max(busy):.1%}"
        if busy else "not measured: no CUDA")
    return out


def load_note(f: dict) -> str:
    """Other processes' CPU seconds during the timed steps, when they used over 10% of a core."""
    o = f["other_cpu_s"]
    return "" if o is None or not f["seconds"] or o <= 0.1 * f["seconds"] else (
        f"; others used {o:.0f} CPU s in its {f['seconds']:.0f} s (skewed)")


def _f(v, fmt: str, none: str = "-") -> str:
    return none if v is None else format(v, fmt)


def print_report(res: dict) -> None:
    """The parts' status, the throughput and bf16 tables, the targets."""
    p, parts = res["probe"], res["parts"]
    dev = p.get("device", {}).get("name", "CPU only")
    print(f"\n# GPU check {res['date']} on {res['host']}: {dev}; torch {p['torch']} "
          f"(CUDA {p['torch_cuda']}); code {res['code']['commit']}\n")
    print("| part | status | detail |\n|---|---|---|")
    for name, part in parts.items():
        detail = part.get("reason", "")
        if "counts" in part:
            detail = ", ".join(f"{v} {k}" for k, v in part["counts"].items())
        print(f"| {name} | {part['status']} | {detail} |")
    rows = parts["throughput"].get("rows", {})
    if rows:
        print(f"\nTraining steps, {res['dataset']['atoms']} atoms per batch "
              f"({res['dataset']['structures']} fcc Cu/Ni/Pd crystals), on {dev}:\n")
        print("| row | parameters | atoms/s | step s | TFLOP/s | % of peak | host syncs/step "
              "| GPU busy | memory | note |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for key, r in rows.items():
        if r.get("status") != "ok":
            print(f"| {key} | | | | | | | | | {r['status']}: {r.get('reason', '')} |")
            continue
        f = row_figures(r, p, key.split()[1])
        print(f"| {key} | {f['params']:,} | {f['atoms_per_s']:,.1f} | {f['step_s']:.3g} | "
              f"{_f(f['tflops'], '.3g')} | {_f(f['peak_share'], '.1%')} | {_f(f['syncs'], 'g')} | "
              f"{_f(f['busy'], '.1%')} | {_f(f['memory'], '.0%')} | peak: {f['peak']}"
              f"{load_note(f)} |")
    bf = parts["bf16_forces"]
    if bf.get("models"):
        print(f"\nbf16 vs fp32 forces, same weights (untrained, seed 0), on {bf['device']}:\n")
        print("| model | kernels | relative RMS force difference | fp32 force RMS (eV/A) | "
              "max abs difference (eV/A) | energy difference (eV/atom) |\n"
              "|---|---|---:|---:|---:|---:|")
        for name, m in bf["models"].items():
            print(f"| {name} | {m['kernels']} | {m['force_rel_rms']:.3g} | "
                  f"{m['force_rms_fp32']:.3g} | {m['force_max_abs_diff']:.3g} | "
                  f"{m['energy_per_atom_abs_diff']:.3g} |")
    print("\nTargets:")
    for name, verdict in res["targets"].items():
        print(f"- {name}: {verdict}")
