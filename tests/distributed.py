"""Run a function on a real N-process gloo group (CPU), the way tests check distributed code.

``run_distributed(fn, world_size=2, *args)`` spawns ``world_size`` fresh processes, joins
them into a ``torch.distributed`` gloo group, calls ``fn(rank, world_size, *args)`` in
each and returns the per-rank results in rank order. ``fn`` must be a module-level
function (spawned processes import it by name) and its result must pickle. A failure in
any rank is re-raised here with that rank's traceback.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from typing import Any, Callable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:  # noqa: BLE001 - every failure goes back to the test
        results.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int = 2, *args: Any, timeout: float = 120) -> list:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, ...)]`` from a gloo group."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world_size:  # drain before joining: a full pipe blocks the child
            rank, ok, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{value}")
            out[rank] = value
    except queue.Empty:
        pass
    finally:
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
    missing = sorted(set(range(world_size)) - set(out))
    if missing:
        codes = [p.exitcode for p in procs]
        raise AssertionError(f"ranks {missing} returned nothing (exit codes {codes}, timeout {timeout}s)")
    return [out[r] for r in range(world_size)]
