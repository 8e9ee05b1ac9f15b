"""bench_md.py child: our release through pretrain.release.calculator, timed by benchmarks.md_timer
(argv[1]: JSON args); with ``profile``, benchmarks.md_profile instead."""

import json, sys
import torch
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
from pretrain.release import MLIPCalculator
calc = MLIPCalculator.from_release(a["release"], fidelity=a["fidelity"], dtype="float32",
                                   coverage="ignore")
params = sum(p.numel() for p in calc.trained.potential.parameters())
if a.get("profile"):
    from benchmarks.md_profile import profile
    print("RESULT " + json.dumps(profile(a, calc) | {"params": params}))
    raise SystemExit
from benchmarks.md_timer import run
run(a, calc, lambda frames: calc.predict(frames, max_atoms=a["max_atoms"]), params,
    f"MLIPCalculator.predict(frames, max_atoms={a['max_atoms']}): batched")
