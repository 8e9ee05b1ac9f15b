"""What the release issue added to a run's start and to ``release verify`` (BENCHMARKS.md,
"Release stage costs").

1. FLOPs per atom counted on the run's own first batches in its loss mode
   (``pretrain/flops.py``, once per run on rank 0 before DeepSpeed wraps the model), for
   the demo model and the named sizes, next to the old fixed fcc-cell figure and next to
   one training step of the same model on the same batches;
2. the physics suite per fidelity in ``release verify`` (float64), for the demo model.

Data: the shipped QM training split (built into ``--work`` by the real builder once).

    .venv/bin/python -m benchmarks.bench_release_costs [--work benchmarks/_work/release] [--repeats 3]
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from benchmarks.harness import REPO, WORK, header, markdown, parser, write_result

MODELS = {"demo": "configs/train/demo.yaml", "mace-s": "configs/model/mace-s.yaml",
          "esen-s": "configs/model/esen-s.yaml"}


def _shards(work: Path) -> Path:
    from data_pipeline.build import build
    from data_pipeline.build.recipe import load_recipe

    out = work / "qm-train"
    if not (out / "manifest.json").is_file():
        build(load_recipe(REPO / "configs" / "data" / "qm-train.yaml"), out, workers=2, progress=False)
    return out


def _train_config(name: str, shards: Path, model_file: str | None = None):
    """The demo's training config on ``shards``; for another name, with that named size's
    model (``model_file``, default ``MODELS[name]``) at its own cutoff."""
    from pretrain.config import load_train_config

    over = [f"data.folder={shards}", "data.stream.workers=0"]
    if name != "demo":
        import yaml

        path = REPO / (model_file or MODELS[name])
        cutoff = yaml.safe_load(path.read_text()).get("cutoff", 6.0)
        over += [f"model={path}", f"data.cutoff={cutoff}"]
    return load_train_config(REPO / MODELS["demo"], over)


def flops_costs(shards: Path, repeats: int) -> dict:
    import torch

    from common.fidelities import FidelityTable
    from data_pipeline.manifest import read_manifest
    from models.build import build_model
    from models.info import model_info
    from pretrain.flops import sample_batches, training_flops

    out = {}
    for name in MODELS:
        cfg = _train_config(name, shards)
        table = FidelityTable.from_manifest(read_manifest(shards))
        torch.manual_seed(0)
        model = build_model(cfg.model, table)
        times, result = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            batches = sample_batches(cfg.data, table.names)
            result = training_flops(model, batches, forces=True, stress=cfg.loss.stress > 0, direct=False)
            times.append(time.perf_counter() - t0)
        step = []
        for _ in range(repeats):  # one training step's forward, forces and backward, no counter
            t0 = time.perf_counter()
            out_ = model(batches[0], forces=True, stress=cfg.loss.stress > 0, create_graph=True)
            sum(v.double().pow(2).sum() for v in out_.values()).backward()
            model.zero_grad(set_to_none=True)
            step.append(time.perf_counter() - t0)
        out[name] = {"count_s": statistics.median(times), "step_s": statistics.median(step),
                     "per_atom": result["per_atom"], "neighbors_per_atom": result["neighbors_per_atom"],
                     "fcc_per_atom": model_info(cfg.model)["train_flops_per_atom"],
                     "parameters": sum(p.numel() for p in model.parameters())}
    return out


def verify_costs(shards: Path, repeats: int) -> dict:
    import torch

    from common.fidelities import FidelityTable
    from data_pipeline.manifest import read_manifest
    from models.build import build_model
    from pretrain.release.verify import physics_lines

    cfg = _train_config("demo", shards)
    table = FidelityTable.from_manifest(read_manifest(shards))
    torch.manual_seed(0)
    model = build_model(cfg.model, table).double().eval()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        physics_lines(model, table)
        times.append(time.perf_counter() - t0)
    return {"fidelities": len(table), "seconds": statistics.median(times)}


def table(flops: dict) -> str:
    """The FLOP counts next to the old fcc figure and the cost of counting them."""
    return markdown(
        ["model", "parameters", "neighbours/atom", "GFLOP/atom, run's batches",
         "GFLOP/atom, fcc Cu cell (before)", "fcc / run", "counting", "one training step"],
        [[name, f"{r['parameters']:,}", f"{r['neighbors_per_atom']:.1f}", f"{r['per_atom'] / 1e9:.3g}",
          f"{r['fcc_per_atom'] / 1e9:.3g}", f"{r['fcc_per_atom'] / r['per_atom']:.2f}x",
          f"{r['count_s']:.3g} s", f"{r['step_s']:.3g} s"] for name, r in flops.items()])


def main(argv=None) -> int:
    p = parser(__doc__, repeats=3, work=WORK / "release",
               out_help="default: printed on stdout only")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    head = header(("torch",))
    shards = _shards(Path(a.work))
    result = {"flops": flops_costs(shards, a.repeats), "verify_physics": verify_costs(shards, a.repeats)}
    print(json.dumps(result, indent=1))
    if a.out:
        write_result(a.out, head | result, table(result["flops"]))
    else:
        print("\n" + table(result["flops"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
