"""The ZBL prior's cost in a training step (BENCHMARKS.md, "Robustness: the ZBL prior").

One training step of the same model with and without ``zbl`` on the same batches: the
first batches the demo's sampler plans on the shipped QM training split (256 atoms),
forward, forces (autograd with ``create_graph``, or the direct heads), stress, and the
backward of a loss on them. Models: the demo's (``configs/train/demo.yaml``) and the
named sizes ``mace-xs`` and ``esen-xs`` at their own cutoff. Steps alternate between the
two settings; medians over ``--repeats`` rounds of all batches.

    .venv/bin/python -m benchmarks.bench_zbl [--work benchmarks/_work/release] [--repeats 7]
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

from benchmarks.bench_release_costs import _shards, _train_config
from benchmarks.harness import WORK, header, markdown, parser, write_result

MODELS = {"demo": None, "mace-xs": "configs/model/mace-xs.yaml", "esen-xs": "configs/model/esen-xs.yaml"}


def _step(model, batches, direct: bool) -> float:
    t0 = time.perf_counter()
    for batch in batches:
        out = model(batch, forces=True, stress=True, create_graph=not direct, direct=direct)
        sum(v.double().pow(2).sum() for v in out.values()).backward()
        model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def measure(name: str, shards: Path, repeats: int, direct: bool) -> dict:
    import torch

    from common.fidelities import FidelityTable
    from data_pipeline.manifest import read_manifest
    from models.build import build_model
    from pretrain.flops import sample_batches

    cfg = _train_config(name, shards, MODELS[name])
    table = FidelityTable.from_manifest(read_manifest(shards))
    batches = sample_batches(cfg.data, table.names)
    models = {}
    for zbl in (False, True):
        torch.manual_seed(0)
        model_cfg = dataclasses.replace(cfg.model, zbl=zbl, direct_forces=direct, direct_stress=direct)
        models[zbl] = build_model(model_cfg, table).train()
    times = {False: [], True: []}
    for zbl in (False, True):  # warm-up
        _step(models[zbl], batches[:1], direct)
    for _ in range(repeats):
        for zbl in (False, True):
            times[zbl].append(_step(models[zbl], batches, direct))
    off, on = statistics.median(times[False]), statistics.median(times[True])
    edges = sum(b["edge_index"].shape[1] for b in batches)
    atoms = sum(int(b["n_atoms"].sum()) for b in batches)
    return {"model": name, "forces": "direct" if direct else "conservative", "batches": len(batches),
            "atoms": atoms, "edges": edges, "step_s_without": off / len(batches),
            "step_s_with": on / len(batches), "overhead": on / off - 1.0,
            "spread_without": [min(times[False]) / len(batches), max(times[False]) / len(batches)],
            "spread_with": [min(times[True]) / len(batches), max(times[True]) / len(batches)]}


def table(rows: list[dict]) -> str:
    """One training step per model, without and with the prior: median (min - max) ms."""
    ms = lambda r, k: (f"{1e3 * r[f'step_s_{k}']:.1f} ({1e3 * r[f'spread_{k}'][0]:.1f} - "  # noqa: E731
                       f"{1e3 * r[f'spread_{k}'][1]:.1f})")
    return markdown(["model", "forces", "atoms", "step ms without zbl", "step ms with zbl", "overhead"],
                    [[r["model"], r["forces"], r["atoms"], ms(r, "without"), ms(r, "with"),
                      f"{r['overhead']:+.1%}"] for r in rows], "llrrrr")


def main(argv=None) -> int:
    p = parser(__doc__, repeats=7, work=WORK / "release",
               out_help="default: printed on stdout only")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    head = header(("torch",))
    shards = _shards(Path(a.work))
    rows = [measure(name, shards, a.repeats, direct=False) for name in MODELS]
    rows.append(measure("demo", shards, a.repeats, direct=True))
    print(json.dumps(rows, indent=1))
    if a.out:
        write_result(a.out, head | {"rows": rows}, table(rows))
    else:
        print("\n" + table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
