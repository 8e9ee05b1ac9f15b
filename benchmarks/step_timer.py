"""Timing training steps inside ``bench_models.py``'s child processes (ours and the peer's).

A child builds its model and batch, defines ``call(loss=False)`` (forward with forces;
with ``loss`` the training loss) and an optimizer, then calls :func:`run`, which prints
one ``RESULT {json}`` line for :func:`benchmarks.harness.run_child`. The module needs only
torch and the standard library: the peer's venv imports it too.

Optional args (``gpu_check.py``): ``warmup`` steps (default 2), ``device`` (a CUDA device
is synchronised around the timed steps; each step's ``loss.item()`` already waits for it)
and ``measures`` (FLOPs, host syncs, GPU busy fraction, memory: ``device_measures.py``).
"""

from __future__ import annotations

import json
import time

import torch

from benchmarks.harness import cpu_snapshot, other_cpu

def training_step(call, opt):
    """One training step: the loss of ``call(loss=True)``, backward, optimizer step."""
    def step():
        loss = call(loss=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def run(a, model, call, opt, atoms, edges, energy_only):
    """``a["warmup"]`` (default 2) warm-up steps, ``a["steps"]`` timed ones; prints
    ``RESULT {json}`` (with device measures when ``a["measures"]``, a profile when
    ``a["profile"]``)."""
    step = training_step(call, opt)
    device = str(a.get("device", "cpu"))
    for _ in range(a.get("warmup", 2)):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before, times = cpu_snapshot(), []
    for _ in range(a["steps"]):
        t = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t)
    seconds = sum(times)
    r = {"seconds": seconds, "other_cpu_s": other_cpu(before, cpu_snapshot()), "steps": a["steps"],
         "step_s": times, "atoms": atoms, "edges": edges, "last_loss": loss,
         "params": sum(p.numel() for p in model.parameters()),
         "atoms_per_s": atoms * a["steps"] / seconds}
    if a.get("measures"):  # after the timing, so that it cannot disturb it
        from benchmarks.device_measures import measure  # noqa: PLC0415
        r["measures"] = measure(step, call, model, device, sorted(times)[len(times) // 2])
    if a.get("profile"):
        r["profile"] = profile(step, call, energy_only, model)
    print("RESULT " + json.dumps(r))


def profile(step, call, energy_only, model, n=3):
    """Phases of a step (mean of ``n``) and torch.profiler's top operators, autograd nodes
    and module forwards over 2 steps."""
    from torch.profiler import profile as tprof, record_function
    def mean_s(fn):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n
    def backward():
        loss = call(loss=True)
        t = time.perf_counter()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t
    out = {"step_s": mean_s(step), "energy_forward_s": mean_s(energy_only),
           "forward_with_forces_s": mean_s(call),
           "loss_backward_s": sum(backward() for _ in range(n)) / n}
    out["optimizer_etc_s"] = out["step_s"] - out["forward_with_forces_s"] - out["loss_backward_s"]
    handles = []
    for name, mod in model.named_modules():  # forward time of modules up to depth 4
        if name and name.count(".") <= 3:
            def pre(m, inp, name=name):
                m._bench_rf = record_function("fwd:" + name)
                m._bench_rf.__enter__()
            try:
                handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(
                    lambda m, i, o: m._bench_rf.__exit__(None, None, None))]
            except RuntimeError:  # TorchScript modules (mace-torch's symmetric contraction)
                pass
    with tprof() as prof:
        for _ in range(2):
            step()
    for h in handles:
        h.remove()
    ev, node = list(prof.key_averages()), "autograd::engine::evaluate_function: "
    ops = sorted((e for e in ev if not e.key.startswith("fwd:")),
                 key=lambda e: -e.self_cpu_time_total)
    nodes = sorted((e for e in ev if e.key.startswith(node)), key=lambda e: -e.cpu_time_total)
    mods = sorted((e for e in ev if e.key.startswith("fwd:")), key=lambda e: -e.cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)  # 2 steps: per step = / 2
    out["top_ops"] = [[e.key, e.count // 2, e.self_cpu_time_total / 2e6,
                       e.self_cpu_time_total / total] for e in ops[:15]]
    out["backward_nodes"] = [[e.key[len(node):], e.count // 2, e.cpu_time_total / 2e6]
                             for e in nodes[:10]]
    out["module_forward"] = [[e.key[4:], e.cpu_time_total / 2e6] for e in mods[:20]]
    return out
