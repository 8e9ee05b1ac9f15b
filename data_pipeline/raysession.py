"""Ray for the data pipeline: join or start a cluster, and run tasks with bounded concurrency.

``RAY_ADDRESS`` set: join that cluster. Otherwise a local Ray with ``workers`` CPUs is
started for the duration of the build and shut down after. If Ray is already initialised
in this process (a notebook, a test session), it is used as it is.

Training ranks streaming through Ray actors join one cluster per job (:func:`connect`),
never one per rank: ``RAY_ADDRESS`` on a real cluster; otherwise rank 0 starts a local Ray
and hands its address to the other ranks over the ``torch.distributed`` group.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def ray_session(workers: int | None) -> Iterator[int]:
    """Yield the number of tasks to keep in flight; start/stop Ray only if we own it."""
    import ray  # noqa: PLC0415 - seconds to import; only commands that need it pay

    owned = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=True,
                                      configure_logging=False)
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
        else:
            ray.init(num_cpus=workers or os.cpu_count() or 1, **kwargs)
        owned = True
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        yield max(1, min(workers, cpus) if workers else cpus)
    finally:
        if owned:
            ray.shutdown()


_INIT_KWARGS: dict[str, Any] = dict(include_dashboard=False, configure_logging=False,
                                    log_to_driver=True)


def connect(world_size: int = 1) -> str:
    """Join this job's Ray cluster from a training rank; return its GCS address.

    Already initialised: used as it is. ``RAY_ADDRESS``: every rank joins it. One rank:
    a local Ray. Several ranks without ``RAY_ADDRESS``: they must share one host and an
    initialised ``torch.distributed`` group; rank 0 starts Ray and broadcasts its address,
    the others join it (a collective: every rank calls this).
    """
    import ray  # noqa: PLC0415

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], **_INIT_KWARGS)
        elif world_size == 1:
            ray.init(**_INIT_KWARGS)
        else:
            _join_rank0_cluster(world_size)
    return ray.get_runtime_context().gcs_address


def _join_rank0_cluster(world_size: int) -> None:
    import socket  # noqa: PLC0415

    import ray  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    if not dist.is_initialized():
        raise RuntimeError(
            f"stream.backend=ray with {world_size} ranks needs RAY_ADDRESS (a Ray cluster every "
            f"rank joins) or an initialised torch.distributed group (rank 0 then starts Ray "
            f"and the other ranks join it); neither is there")
    hosts: list = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    if len(set(hosts)) > 1:
        raise RuntimeError(
            f"stream.backend=ray: the ranks run on {len(set(hosts))} hosts; start a Ray cluster "
            f"over them (`ray start --head` on one, `ray start --address=...` on the others) and "
            f"set RAY_ADDRESS, so that every rank joins that one cluster")
    address = [None]
    if dist.get_rank() == 0:
        ray.init(**_INIT_KWARGS)
        address = [ray.get_runtime_context().gcs_address]
    dist.broadcast_object_list(address, src=0)
    if dist.get_rank() != 0:
        ray.init(address=address[0], **_INIT_KWARGS)


def run_tasks(fn: Callable, arg_list: list[tuple], limit: int,
              on_done: Callable[[tuple, Any], None] | None = None) -> list[Any]:
    """Run ``fn(*args)`` as Ray tasks, at most ``limit`` at once; results in input order.

    ``on_done(args, result)`` runs in the driver as each task finishes (progress, fail-fast:
    an exception it raises cancels the tasks still running and propagates). A task that
    dies with its worker is retried by Ray (``max_retries``); tasks must be idempotent.
    """
    import ray  # noqa: PLC0415

    remote = ray.remote(num_cpus=1, max_retries=3)(fn)
    results: list[Any] = [None] * len(arg_list)
    pending: dict[Any, int] = {}
    next_i = 0
    try:
        while next_i < len(arg_list) or pending:
            while next_i < len(arg_list) and len(pending) < limit:
                pending[remote.remote(*arg_list[next_i])] = next_i
                next_i += 1
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            results[i] = ray.get(ready[0])
            if on_done is not None:
                on_done(arg_list[i], results[i])
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
    return results
