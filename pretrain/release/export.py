"""``release export``: a release as one ``torch.export`` program, energy and served forces.

The exported program takes plain tensors, not a Batch dict (:data:`INPUTS`), and returns
``energy`` (float64 ``[G]``) and ``forces`` (``[N, 3]``, the model's dtype) as the release
serves them: ``-dE/dr``, or its direct head's for a direct-force release. The
neighbor list is not in the graph: the caller computes ``edge_index`` and ``cell_shifts``
at the release's cutoff (``data_pipeline.graph.neighbor_list`` / vesin, or any list with
the same convention: ``vector = positions[j] - positions[i] + cell_shifts @ cell[batch[i]]``,
both directions of every pair). N, E and G are dynamic (``torch.export.Dim``): one program
serves any structure and any batch of structures. The program does not validate its
inputs (a traced graph cannot branch on values): the caller keeps charge within
-10..10, spin multiplicity within 0..10 and atomic numbers within 1..118, as the
calculator checks for the eager model.

How the forces get into the graph (torch 2.13, measured): ``torch.export.export`` of a
module that calls ``torch.autograd.grad`` fails in both modes. Non-strict tracing runs
above autograd (pre-dispatch), so the backward pass runs outside the trace and its saved
tensors end up as fake constants ("We found a fake tensor in the exported program
constant's list"); strict mode refuses ``autograd.grad`` unless
``torch._dynamo.config.trace_autograd_ops`` is set, and with it the backward graph again
captures forward intermediates as constants (wrong on any other shape); ``torch.func``
transforms fail in both modes ("meta conversion to view functorch tensor"). What works is
non-strict export traced *below* autograd (``pre_dispatch=False``, the same ATen-level
tracing AOTAutograd uses): the autograd engine then runs inside the trace and its
backward ops are recorded like any other, so the program holds forward and backward as
one graph of ATen ops. That flag is reached through ``torch.export._trace._export``
(private: torch is pinned in constraints/cpu.txt, and :func:`export_program` is the one
place to change if it moves).

The ``.pt2`` file is torch.export's archive (a zip of JSON graph, JSON metadata and raw
tensor bytes, ``torch.export.pt2_archive``): ``torch.export.load`` deserialises the graph
from JSON and reads weights as tensors, no pickle of the program. AOTInductor (``--aoti``)
compiles that program to a C++ shared library packaged as a second ``.pt2``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from torch import nn

from data_pipeline import keys as K
from pretrain.release.format import CONFIG, WEIGHTS, ReleaseError, sha256_file
from pretrain.release.loader import load_release

FORMAT = "mlip-pretrain-export"
FORMAT_VERSION = 1

#: ``(name, dtype, shape, meaning)`` of each input of the exported program, in order
INPUTS = (
    (K.POSITIONS, "float [N, 3]", "Angstrom"),
    (K.NUMBERS, "int64 [N]", "atomic numbers"),
    (K.EDGE_INDEX, "int64 [2, E]", "(centre i, neighbour j) of every directed pair within the cutoff"),
    (K.CELL_SHIFTS, "float [E, 3]", "integer image shift S of each edge, as floats"),
    (K.CELL, "float [G, 3, 3]", "rows are lattice vectors (zeros for molecules)"),
    (K.BATCH, "int64 [N]", "structure of each atom, 0..G-1, sorted"),
    (K.FIDELITY, "int64 [G]", "index into the fidelity table of the sidecar"),
    (K.CHARGE, "int64 [G]", "total charge (0: unknown)"),
    (K.SPIN, "int64 [G]", "spin multiplicity (0: unknown)"),
    (K.N_ATOMS, "int64 [G]", "atoms per structure"),
)
OUTPUTS = (("energy", "float64 [G]", "eV"),
           ("forces", "float [N, 3]", "eV/Angstrom: -dE/dpositions, or the direct head's for a release "
            "that serves direct forces (sidecar 'forces')"))
NEIGHBOR_LIST = ("computed by the caller at the cutoff (not in the program): vector of edge e = "
                 "positions[j] - positions[i] + cell_shifts[e] @ cell[batch[i]], both directions")


class ExportError(ReleaseError):
    """An export that cannot be made; the message says which step and what to do."""


class ExportedPotential(nn.Module):
    """A Potential behind a plain-tensor signature (:data:`INPUTS` -> energy, forces).

    Forces as the release serves them: conservative (``torch.autograd.grad`` of the energy
    inside ``forward``, grad mode on even under ``no_grad``) or, with ``direct``, the
    direct force head's; outputs detached.
    """

    def __init__(self, potential: nn.Module, direct: bool = False):
        super().__init__()
        self.potential, self.direct = potential, direct

    def forward(self, positions, numbers, edge_index, cell_shifts, cell, batch, fidelity, charge,
                spin, n_atoms) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = (positions, numbers, edge_index, cell_shifts, cell, batch, fidelity, charge, spin, n_atoms)
        with torch.enable_grad():
            out = self.potential(dict(zip((name for name, *_ in INPUTS), inputs)), forces=True,
                                 stress=False, create_graph=False, direct=self.direct)
        return out["energy"].detach(), out["forces"].detach()


def batch_inputs(atoms_list, cutoff: float, fidelity: int | list[int], dtype: str) -> tuple:
    """The exported program's inputs for ASE ``atoms_list`` (neighbor list by vesin)."""
    from data_pipeline.batch import atoms_batch, to_torch  # noqa: PLC0415

    batch = to_torch(atoms_batch(atoms_list, cutoff, fidelity, dtype))
    return tuple(batch[name] for name, *_ in INPUTS)


def example_structures():
    """Four structures of distinct sizes (32-atom fcc cell, 13-atom cluster, dimer, 1-atom
    cell): the trace must see N, E and G above 1 and unequal, or torch.export would fix
    a size (0/1 specialisation) or tie two of them together."""
    from ase import Atoms  # noqa: PLC0415
    from ase.build import bulk  # noqa: PLC0415
    from ase.cluster import Icosahedron  # noqa: PLC0415

    cluster = Icosahedron("Cu", 2)
    cluster.numbers[:3] = 79
    return [bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2)), cluster,
            Atoms("CuAu", positions=[[0, 0, 0], [0, 0, 2.4]]), bulk("Ni", "fcc", a=3.5)]


def export_program(potential: nn.Module, dtype: str = "float32", direct: bool = False) -> torch.export.ExportedProgram:
    """``torch.export`` program of ``potential`` (moved to ``dtype``, weights frozen), with
    dynamic N, E and G (see the module docstring for why ``pre_dispatch=False``)."""
    from torch.export._trace import _export  # noqa: PLC0415

    potential = potential.to(getattr(torch, dtype)).eval().requires_grad_(False)
    n_fid = len(potential.fidelities)
    structures = example_structures()
    example = batch_inputs(structures, potential.cutoff, [k % n_fid for k in range(len(structures))], dtype)
    n, e, g = (torch.export.Dim("n_atoms", min=1), torch.export.Dim("n_edges", min=0),
               torch.export.Dim("n_graphs", min=1))
    dims = {K.POSITIONS: {0: n}, K.NUMBERS: {0: n}, K.EDGE_INDEX: {1: e}, K.CELL_SHIFTS: {0: e},
            K.CELL: {0: g}, K.BATCH: {0: n}, K.FIDELITY: {0: g}, K.CHARGE: {0: g}, K.SPIN: {0: g},
            K.N_ATOMS: {0: g}}
    # node stack traces are debug metadata; collecting them is a large share of tracing time
    emit, torch.fx.config.do_not_emit_stack_traces = torch.fx.config.do_not_emit_stack_traces, True
    try:
        return _export(ExportedPotential(potential, direct), example, dynamic_shapes=dims, strict=False,
                       pre_dispatch=False)
    except Exception as err:  # noqa: BLE001 - any tracing failure becomes one line naming the model
        raise ExportError(f"torch.export of the {type(potential.backbone).__name__} potential failed: "
                          f"{type(err).__name__}: {str(err).splitlines()[0][:300]}") from err
    finally:
        torch.fx.config.do_not_emit_stack_traces = emit


def compare(program, potential: nn.Module, atoms_list, fidelity: int = 0, direct: bool = False) -> dict:
    """Largest relative energy and absolute force differences, program vs eager model."""
    dtype = str(next(potential.parameters()).dtype).removeprefix("torch.")
    inputs = batch_inputs(atoms_list, potential.cutoff, fidelity, dtype)
    energy, forces = program(*inputs)
    with torch.enable_grad():
        ref = potential(dict(zip((name for name, *_ in INPUTS), inputs)), forces=True, create_graph=False,
                        direct=direct)
    rel = ((energy - ref["energy"]).abs() / ref["energy"].abs().clamp_min(1e-12)).max().item()
    return {"atoms": int(inputs[1].numel()), "edges": int(inputs[2].shape[1]),
            "energy_rel": rel, "forces_abs": (forces - ref["forces"]).abs().max().item()}


def sidecar(folder: Path, config: dict, program: Path, dtype: str, aoti: Path | None) -> dict:
    """The JSON written beside the program: what it is, where from, how to call it."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "program": program.name,
        "aoti_package": aoti.name if aoti else None,
        "release": {"folder": str(folder.resolve()), "name": config.get("name"),
                    "config_sha256": sha256_file(folder / CONFIG),
                    "weights_sha256": sha256_file(folder / WEIGHTS)},
        "fidelities": config["fidelities"], "cutoff": config["cutoff"], "dtype": dtype,
        "forces": config["forces"],
        "units": config.get("units"), "neighbor_list": NEIGHBOR_LIST,
        "inputs": [dict(zip(("name", "type", "meaning"), row)) for row in INPUTS],
        "outputs": [dict(zip(("name", "type", "meaning"), row)) for row in OUTPUTS],
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


@dataclasses.dataclass
class Exported:
    """What :func:`export_release` wrote and measured."""

    program: Path
    sidecar: Path
    aoti: Path | None
    checks: list[dict]


def default_out(folder: Path, out: str | Path | None) -> Path:
    """``<release>.pt2`` beside the folder; never inside it (files there would break its
    SHA256SUMS)."""
    path = Path(out) if out else folder.parent / f"{folder.resolve().name}.pt2"
    if folder.resolve() in path.resolve().parents:
        raise ExportError(f"--out {path} is inside the release folder {folder}: a release holds only "
                          "the files its SHA256SUMS lists; write the export beside it")
    if path.suffix != ".pt2":
        raise ExportError(f"--out {path}: the program file must end in .pt2")
    return path


def export_release(folder: str | Path, out: str | Path | None = None, dtype: str = "float32",
                   aoti: bool = False) -> Exported:
    """Export release ``folder`` (checksums verified) to ``out`` (+ ``.json`` sidecar), check
    the program against the eager model on the example structures, optionally AOTInductor."""
    folder = Path(folder)
    path = default_out(folder, out)
    trained = load_release(folder)
    config, direct = trained.release_config, trained.direct
    potential = trained.potential.to(getattr(torch, dtype))
    ep = export_program(potential, dtype, direct)
    program = ep.module()
    checks = [compare(program, potential, [s], direct=direct) for s in example_structures()]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(ep, str(path))
    side = path.with_suffix(".json")
    side.write_text(json.dumps({**sidecar(folder, config, path, dtype, None), "checks": checks}, indent=1))
    packaged = None
    if aoti:  # program and sidecar are written first: a compiler failure leaves them usable
        packaged = compile_aoti(ep, path.with_name(f"{path.stem}-aoti.pt2"))
        check_aoti(packaged, folder, dtype)
        side.write_text(json.dumps({**sidecar(folder, config, path, dtype, packaged), "checks": checks}, indent=1))
    return Exported(path, side, packaged, checks)


def compile_aoti(ep: torch.export.ExportedProgram, path: Path) -> Path:
    """AOTInductor package of ``ep`` at ``path`` (C++ compiler needed); a failure is an
    :class:`ExportError` naming the cause, the torch.export program stays usable."""
    try:
        return Path(torch._inductor.aoti_compile_and_package(ep, package_path=str(path)))
    except Exception as err:  # noqa: BLE001 - compiler errors are long; one line, the cause
        raise ExportError(f"AOTInductor compile of {path.name} failed ({type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}); "
                          "the torch.export program beside it is unaffected") from err


def check_aoti(package: Path, folder: Path, dtype: str) -> None:
    """Run the AOTInductor package on the example structures, in a child process (the
    generated C++ code can abort the process it runs in: measured on torch 2.13 CPU, the
    MACE package compiles, then its fused slot gather fails its own bounds check, "index
    out of bounds: 0 <= tmp37 < ks0", or the runtime terminates on a ``c10::Error``); a
    crash or a mismatch is an :class:`ExportError` of one line."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    r = subprocess.run([sys.executable, "-m", "pretrain.release.export", str(package), str(folder), dtype],
                       capture_output=True, text=True)
    if r.returncode == 0:
        return
    lines = [ln.strip() for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    said = [ln for ln in lines if ln.startswith(AOTI_FAILED)]
    aborted = [ln for ln in lines if ln.startswith("terminate called after")]
    cause = said[-1].removeprefix(AOTI_FAILED) if said else (
        (aborted or [ln for ln in lines if "rror" in ln] or lines or [""])[-1] + f"; exit {r.returncode}")
    raise ExportError(f"AOTInductor package {package} compiled but fails on the example structures "
                      f"({cause[:300]}); use the torch.export program beside it")


AOTI_FAILED = "aoti check failed: "


def _check_aoti_child(package: str, folder: str, dtype: str) -> int:
    """The child of :func:`check_aoti`: load the package and the release, compare."""
    trained = load_release(folder)
    potential = trained.potential.to(getattr(torch, dtype))
    runner = torch._inductor.aoti_load_package(package)
    for structure in example_structures():
        try:
            diff = compare(runner, potential, [structure], direct=trained.direct)
        except Exception as err:  # noqa: BLE001 - the runtime error of generated C++ code
            print(f"{AOTI_FAILED}{len(structure)}-atom structure: {str(err).strip().splitlines()[0][:200]}",
                  flush=True)
            return 1
        if diff["energy_rel"] > 1e-5 or diff["forces_abs"] > 1e-4:
            print(f"{AOTI_FAILED}differs from the eager model ({diff})", flush=True)
            return 1
    return 0


def export_command(release: str, fmt: str, out: str | None, dtype: str = "float32",
                   aoti: bool = False) -> int:
    """``mlip-pretrain release export``: write the program and its sidecar, print where."""
    if fmt != "torch-export":
        raise ExportError(f"--format {fmt}: only torch-export is implemented")
    done = export_release(release, out, dtype, aoti)
    worst_e = max(c["energy_rel"] for c in done.checks)
    worst_f = max(c["forces_abs"] for c in done.checks)
    print(f"[export] {done.program} (+ {done.sidecar.name}): energy and forces, dynamic N, E, G, {dtype}; "
          f"vs the eager model on {len(done.checks)} structures: energy rel. diff <= {worst_e:.1e}, "
          f"forces abs. diff <= {worst_f:.1e} eV/A")
    if done.aoti:
        print(f"[export] AOTInductor package: {done.aoti}")
    return 0


if __name__ == "__main__":  # the child of check_aoti: PACKAGE RELEASE DTYPE
    import sys

    sys.exit(_check_aoti_child(*sys.argv[1:4]))
