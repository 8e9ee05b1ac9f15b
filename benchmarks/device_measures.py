"""What a training step does on its device, for ``gpu_check.py``'s throughput children.

Called by :func:`benchmarks.step_timer.run` when its args ask for ``measures``, in our
child and in the peer's (torch and the standard library only):

- **FLOPs** of one step (forward, forces with ``create_graph``, loss backward; not the
  optimizer) counted as ``models/info.py`` counts them: ``FlopCounterMode``, dense ops only
  (matmul, einsum, bmm), a lower bound on arithmetic; on any device.
- **Host syncs per step** (CUDA only): ``torch.cuda.set_sync_debug_mode("warn")`` makes
  every synchronizing CUDA call (``.item()``, a device-to-host copy, ``nonzero``, ...)
  warn; the warnings of a few steps are counted, grouped by the Python line that caused
  them. The step's own ``loss.item()`` is one of them. A ``torch.profiler`` trace counts
  ``cudaStreamSynchronize``/``cudaDeviceSynchronize``/``cudaEventSynchronize`` calls and
  device-to-host copies as a second opinion.
- **GPU busy fraction** (CUDA only): the union of the intervals of all device activity
  (kernels, copies, memsets) in a profiler trace of a few steps, divided by the steps'
  wall time measured without the profiler (the profiler slows the host side, not kernels).
- **Peak device memory** (CUDA only) of the timed steps, and the device's total.
"""

from __future__ import annotations

import collections
import time
import warnings

import torch

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def measure(step, call, model, device: str, step_s: float, n: int = 3) -> dict:
    """FLOPs per step everywhere; on CUDA also host syncs, busy fraction and memory."""
    out = {"flops_per_step": step_flops(call, model)}
    if not device.startswith("cuda"):
        return out | {"cuda_measures": "skipped: no CUDA (host syncs, GPU busy and memory "
                                       "are GPU measures)"}
    out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out["device_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    out["host_syncs"] = count_syncs(step, n)
    out["gpu_busy"] = busy_fraction(step, step_s, n)
    return out


def step_flops(call, model) -> float | str:
    """FLOPs of one forward + forces + loss backward (as ``models/info.py`` counts them), or
    why they could not be counted (the counter's module tracking fails on some models)."""
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    try:
        with FlopCounterMode(display=False) as counter:
            call(loss=True).backward()
    except RuntimeError as e:
        return f"not counted: FlopCounterMode failed: {str(e).splitlines()[0][:200]}"
    finally:
        model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def count_syncs(step, n: int) -> dict:
    """Synchronizing CUDA calls per step, by sync debug mode (grouped by source line) and
    by profiler trace."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(n):
                step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    hits = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where = collections.Counter(f"{w.filename}:{w.lineno}" for w in hits)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
    names = collections.Counter(e.name for e in prof.events())
    return {"per_step": len(hits) / n,
            "by_line": [[k, v / n] for k, v in where.most_common(8)],
            "trace_sync_calls_per_step": sum(names[k] for k in SYNC_CALLS) / n,
            "trace_dtoh_copies_per_step": sum(v for k, v in names.items() if "DtoH" in k) / n}


def busy_fraction(step, step_s: float, n: int) -> dict:
    """Device-active time per step (union of activity intervals) over the unprofiled step."""
    from torch.autograd import DeviceType  # noqa: PLC0415
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(n):
            step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events()  # not the GPU rows
             if e.device_type == DeviceType.CUDA
             and not getattr(e, "is_user_annotation", False)]  # of annotations
    busy_s = union_length(spans) / 1e6 / n  # profiler times are microseconds
    return {"fraction": min(1.0, busy_s / step_s) if step_s > 0 else None,
            "busy_s_per_step": busy_s, "step_s_unprofiled": step_s,
            "step_s_profiled": wall / n, "device_events_per_step": len(spans) / n}


def union_length(spans) -> float:
    """Total length covered by ``(start, end)`` intervals, overlaps counted once."""
    total, end = 0.0, None
    for s, e in sorted(spans):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total
