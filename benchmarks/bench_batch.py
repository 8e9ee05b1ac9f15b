"""Batched ``predict`` structures/s of our release vs the batch size (issue 28, item 1:
"no worse at 1,024-atom batches than at 128").

The ``benchmarks/md_model.yaml`` release (built and cached by ``bench_md``) predicts energy,
forces and stress of ``bench_md``'s predict structures (rattled, strained fcc cells of 8-64
atoms) with ``MLIPCalculator.predict(frames, max_atoms=B)`` for each batch size B, float32,
2 threads, CPU; each (B, repetition) in a fresh process, interleaved, after a warm-up call.

    .venv/bin/python -m benchmarks.bench_batch [--sizes 128,256,512,1024,4096] [--repeats 3] [--kernels auto]
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.bench_md import ensure_release, write_structures
from benchmarks.harness import (REPO, RESULTS, WORK, Runs, header, load_note, log, markdown, parser,
                                run_child, write_result)

CHILD = r"""
import json, sys, os
import torch
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
from pretrain.release import MLIPCalculator
from benchmarks.md_timer import predict
calc = MLIPCalculator.from_release(a["release"], fidelity=a["fidelity"], dtype="float32", coverage="ignore")
r = predict(lambda frames: calc.predict(frames, max_atoms=a["max_atoms"]), a["predict"])
print("RESULT " + json.dumps(r))
"""


def main(argv=None) -> int:
    p = parser(__doc__, repeats=3, tries=2, work=WORK / "md", out=RESULTS / "batch.json")
    p.add_argument("--sizes", default="128,256,512,1024,4096")
    p.add_argument("--structures", type=int, default=300, help="predict structures (bench_md's set)")
    p.add_argument("--kernels", default="auto", choices=["auto", "torch"],
                   help="torch: the model's torch ops instead of the fused CPU kernels")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    res = header()
    work = Path(a.work).resolve()
    release = ensure_release(work)
    data = write_structures(work, a.structures)
    fidelity = json.loads((release / "config.json").read_text())["fidelities"][0]["name"]
    env = {"MLIP_PRETRAIN_KERNELS": a.kernels}
    sizes = [int(s) for s in a.sizes.split(",")]
    runs = Runs([str(s) for s in sizes], a.repeats, a.tries)

    def job(size):
        args = {"release": str(release), "fidelity": fidelity, "predict": data["predict"],
                "max_atoms": size, "threads": a.threads}
        return lambda: run_child(CHILD, args, REPO, f"predict, batches of {size} atoms", env=env)

    runs.interleaved({str(s): job(s) for s in sizes},
                     lambda k: lambda r: f"batches of {k} atoms: {r['structures_per_s']:.2f} structures/s")
    rates = runs.summary(lambda r: r["structures_per_s"])
    base = rates[str(sizes[0])]["median"]
    rows = [[f"{s:,}", f"{rates[str(s)]['median']:.2f} ({rates[str(s)]['min']:.2f} - {rates[str(s)]['max']:.2f})",
             f"{rates[str(s)]['median'] / base:.2f}x"] for s in sizes]
    res |= {"kernels": a.kernels, "structures": data["predict_structures"], "atoms": data["predict_atoms"],
            "structures_per_s": rates} | runs.record()
    table = markdown(["atoms per batch", "structures/s, median (min - max)", f"vs {sizes[0]}"], rows)
    write_result(a.out, res, table + "\n\n" + load_note(res))
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
