"""Ray for the data pipeline: join or start a cluster, and run tasks with bounded concurrency.

``RAY_ADDRESS`` set: join that cluster. Otherwise a local Ray with ``workers`` CPUs is
started for the duration of the build and shut down after. If Ray is already initialised
in this process (a notebook, a test session), it is used as it is.
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
