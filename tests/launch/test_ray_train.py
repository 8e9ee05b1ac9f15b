"""``launch ray`` on a real 2-node Ray cluster on loopback (``ray start --head`` plus a
second ``ray start --address`` with its own temp dir, 2 CPUs each): 2 Ray Train workers
train, one is killed mid-run, Ray restarts the group, and the run resumes from its
checkpoint and finishes with the uninterrupted run's weights."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.distributed import _free_port
from tests.launch.conftest import REPO, launch_config
from tests.pretrain.test_train import _descendants, final_weights, losses

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


def _ray_start(*args: str, temp: Path) -> subprocess.Popen:
    """A Ray node in the foreground (``--block``): ending this process stops its node."""
    ray = Path(sys.executable).parent / "ray"
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    return subprocess.Popen([str(ray), "start", "--block", "--num-cpus=2", "--num-gpus=0",
                             "--disable-usage-stats", f"--temp-dir={temp}", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The address of a 2-node Ray cluster on 127.0.0.1, stopped after the module."""
    if shutil.which("ray", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("the ray command is not installed beside this Python")
    tmp = Path("/tmp") / f"rt{os.getpid()}"  # Ray's socket paths must stay short
    port = _free_port()
    head = _ray_start("--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--include-dashboard=false",
                      temp=tmp / "head")
    nodes = [head]
    try:
        address = f"127.0.0.1:{port}"
        time.sleep(5)
        nodes.append(_ray_start(f"--address={address}", "--node-ip-address=127.0.0.1", temp=tmp / "worker"))
        _wait_nodes(address, 2, nodes)
        yield address
    finally:
        for p in reversed(nodes):
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_nodes(address: str, count: int, nodes: list, timeout: float = 180) -> None:
    probe = ("import ray; ray.init(address=%r, log_to_driver=False, configure_logging=False); "
             "print(sum(n['Alive'] for n in ray.nodes()))" % address)
    deadline = time.monotonic() + timeout
    while True:
        for p in nodes:
            if p.poll() is not None:
                pytest.skip(f"a Ray node did not start here: {p.communicate()[0][-2000:]}")
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                              env=dict(os.environ, RAY_AUTH_MODE="disabled"), timeout=120)
        if done.returncode == 0 and done.stdout.strip().splitlines()[-1] == str(count):
            return
        if time.monotonic() > deadline:
            pytest.skip(f"the 2-node Ray cluster did not come up: {done.stderr[-2000:]}")
        time.sleep(2)


def _train_workers(nodes_root: list[int]) -> list[int]:
    """Live Ray Train worker processes below our nodes' processes."""
    found = []
    for pid in {d for root in nodes_root for d in _descendants(root)}:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::RayTrainWorker"):
            found.append(pid)
    return sorted(found)


@pytest.mark.slow
def test_worker_killed_mid_run_restarts_from_checkpoint(cluster, built, tmp_path, uninterrupted):
    config = launch_config(tmp_path, built[1], "ray")
    out = tmp_path / "ray"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "launch", "ray", str(config),
                             "--address", cluster, "--workers", "2", "--max-failures", "2"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "no third step within 600 s"
        time.sleep(0.2)
    roots = [int(p) for p in _node_pids()]
    workers = _train_workers(roots)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    text = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, text[-4000:]
    assert "resumed from" in text, text[-4000:]
    assert losses(out) == losses(uninterrupted)
    a, b = final_weights(out), final_weights(uninterrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _node_pids() -> list[int]:
    """Raylet processes of this test's cluster (their command lines name our temp dir)."""
    mine = f"/tmp/rt{os.getpid()}/"
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "raylet" in cmd and mine in cmd:
            pids.append(int(cmdline.parent.name))
    return pids
