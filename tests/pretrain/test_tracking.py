"""Tracking against real MLflow stores: a SQLite file per test and one loopback server."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from common.config import ConfigError
from pretrain.tracking import Tracker, TrackingConfig, TrackingError, code_version, system_metrics

CONFIG = {"model": {"channels": 64, "layers": 2}, "train": {"lr": 3e-4, "note": "x" * 7000}, "seed": 1}
PARAMS = {"data.content_hash": "ab12", "model.parameters": 1234, "world_size": 1}
# mlflow 3.17's SQLAlchemy store trips this SQLAlchemy deprecation on every new store
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


@pytest.fixture(autouse=True)
def no_env_uri(monkeypatch, tmp_path):
    """No store from the environment, and a working directory that must stay empty."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield
    assert not list(cwd.iterdir()), "MLflow wrote into the working directory"


def client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def history(c, run_id, key):
    return [(m.step, m.value) for m in sorted(c.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_run_is_recorded_and_read_back(tmp_path):
    out = tmp_path / "out"
    t = Tracker(TrackingConfig(run_name="tiny", system_every=2), out)
    assert t.tracking_uri == f"sqlite:///{out}/mlflow.db"
    run_id = t.start(CONFIG, PARAMS, tags={"purpose": "test"})
    for step, loss in enumerate([1.0, 0.5, math.nan]):
        t.log_metrics({"train/loss": loss, "train/lr": 1e-3}, step=step)
    (tmp_path / "note.txt").write_text("hello")
    t.log_artifact(tmp_path / "note.txt", "notes")
    t.end()
    t.end()  # a second end does nothing

    c = client(t.tracking_uri)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    p = run.data.params
    assert p["model.channels"] == "64" and p["train.lr"] == "0.0003" and p["seed"] == "1"
    assert p["data.content_hash"] == "ab12" and p["model.parameters"] == "1234"
    assert p["train.note"] == "x" * 6000  # MLflow's param length limit
    tags = run.data.tags
    assert tags["git_commit"] == code_version()["git_commit"]
    assert tags["git_dirty"] in ("true", "false") and tags["purpose"] == "test"
    loss = history(c, run_id, "train/loss")
    assert [s for s, _ in loss] == [0, 1, 2] and loss[:2] == [(0, 1.0), (1, 0.5)] and math.isnan(loss[2][1])
    assert [s for s, _ in history(c, run_id, "system/rss_gib")] == [0, 2]
    assert {a.path for a in c.list_artifacts(run_id)} == {"config.yaml", "notes"}
    assert [a.path for a in c.list_artifacts(run_id, "notes")] == ["notes/note.txt"]
    assert "channels: 64" in (out / "mlflow-artifacts" / run_id / "artifacts" / "config.yaml").read_text()
    with pytest.raises(ValueError, match="DONE"):
        t.end("DONE")


def test_resume_continues_the_run_and_refuses_changed_params(tmp_path):
    cfg = TrackingConfig()
    first = Tracker(cfg, tmp_path)
    run_id = first.start(CONFIG, PARAMS)
    first.log_metrics({"loss": 1.0}, step=0)
    first.end("KILLED")
    c = client(first.tracking_uri)
    assert c.get_run(run_id).info.status == "KILLED"
    n_params = len(c.get_run(run_id).data.params)

    again = Tracker(cfg, tmp_path)
    assert again.start(CONFIG, PARAMS, tags={"git_commit": "later"}, run_id=run_id) == run_id
    assert c.get_run(run_id).info.status == "RUNNING"
    again.log_metrics({"loss": 0.5}, step=1)
    again.end()
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and len(run.data.params) == n_params
    assert run.data.tags["resumed.git_commit"] == "later" != run.data.tags["git_commit"]
    assert history(c, run_id, "loss") == [(0, 1.0), (1, 0.5)]
    assert len(c.search_runs([run.info.experiment_id])) == 1

    changed = {**CONFIG, "model": {"channels": 128, "layers": 2}}
    with pytest.raises(TrackingError, match=r"'model.channels' was '64', now '128'"):
        Tracker(cfg, tmp_path).start(changed, PARAMS, run_id=run_id)
    assert c.get_run(run_id).data.params["model.channels"] == "64"
    assert c.get_run(run_id).info.status == "FINISHED"  # refused before writing anything
    with pytest.raises(TrackingError, match="not found"):
        Tracker(cfg, tmp_path).start(CONFIG, PARAMS, run_id="0" * 32)


@pytest.mark.parametrize("cfg, rank", [(TrackingConfig(), 1), (TrackingConfig(enabled=False), 0)])
def test_inactive_tracker_writes_nothing(tmp_path, cfg, rank):
    out = tmp_path / "out"
    t = Tracker(cfg, out, rank=rank)
    assert t.start(CONFIG, PARAMS) is None
    t.log_metrics({"loss": 1.0}, step=0)
    t.log_artifact(tmp_path / "missing.txt")
    t.end("FAILED")
    assert t.run_id is None and t.tracking_uri is None and not out.exists()


def test_logging_before_start_is_an_error(tmp_path):
    with pytest.raises(TrackingError, match="start"):
        Tracker(TrackingConfig(), tmp_path).log_metrics({"loss": 1.0}, step=0)


def test_environment_uri_is_honoured_and_config_uri_wins(tmp_path, monkeypatch):
    other = f"sqlite:///{tmp_path}/other.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    t = Tracker(TrackingConfig(), tmp_path / "out")
    assert t.tracking_uri == other
    run_id = t.start(CONFIG, PARAMS)
    t.end()
    assert client(other).get_run(run_id).data.params["seed"] == "1"
    assert not (tmp_path / "out" / "mlflow.db").exists()
    assert Tracker(TrackingConfig(uri="sqlite:///x.db"), tmp_path).tracking_uri == "sqlite:///x.db"


def test_importing_tracking_does_not_import_mlflow():
    code = "import sys, pretrain.tracking; assert 'mlflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_code_version_system_metrics_and_config_check(tmp_path):
    with pytest.raises(ConfigError, match="tracking.system_every"):
        TrackingConfig(system_every=-1).validate()
    if (Path(__file__).parents[2] / ".git").exists():
        assert len(code_version()["git_commit"]) == 40
    assert code_version(tmp_path)["git_commit"] == "unknown"
    assert code_version(tmp_path)["git_dirty"] == "unknown"
    m = system_metrics()
    assert 0 < m["system/rss_gib"] <= m["system/peak_rss_gib"] < 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on loopback with a SQLite backend; yields (uri, artifact folder)."""
    port, art = free_port(), tmp_path / "server-artifacts"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # else job workers: 2.4 GB instead of 0.5 GB
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(art),
           "--workers", "1"]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start:\n{(tmp_path / 'server.log').read_text()}")
                time.sleep(0.2)
        yield uri, art
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn child
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_server_store(tmp_path, monkeypatch, mlflow_server):
    uri, art = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    t = Tracker(TrackingConfig(experiment="served"), tmp_path / "out")
    run_id = t.start(CONFIG, PARAMS)
    t.log_metrics({"loss": 2.0, "energy_mae": 0.1}, step=3)
    t.end()
    c = client(uri)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.channels"] == "64"
    assert history(c, run_id, "energy_mae") == [(3, 0.1)]
    assert [a.path for a in c.list_artifacts(run_id)] == ["config.yaml"]
    assert list(art.rglob("config.yaml")) and not (tmp_path / "out").exists()


def test_study_helpers_tag_search_and_log_result_runs(tmp_path):
    from pretrain.tracking import experiment_runs, log_result_run, tag_run

    uri = f"sqlite:///{tmp_path / 'study' / 'mlflow.db'}"
    runs = []
    for point in ("a", "b"):
        t = Tracker(TrackingConfig(uri=uri, experiment="s", tags={"scale.study": "s", "scale.point": point},
                                   artifact_location=(tmp_path / "art").as_uri()), tmp_path / point)
        runs.append(t.start({"seed": 1}, {}))
        t.log_metrics({"val/PBE/forces_mae": 0.5}, step=3)
        t.end()
    tag_run(uri, runs[1], {"scale.status": "finished", "scale.C": 12.5}, {"scale/C": 12.5}, step=3)
    found = experiment_runs(uri, "s", "scale.status", "finished")
    assert [r["run_id"] for r in found] == [runs[1]]
    assert found[0]["tags"]["scale.point"] == "b" and found[0]["tags"]["scale.C"] == "12.5"
    assert found[0]["metrics"] == {"val/PBE/forces_mae": 0.5, "scale/C": 12.5}
    assert len(experiment_runs(uri, "s")) == 2
    (tmp_path / "fit.json").write_text("{}")
    fit = log_result_run(uri, "s", "fit-s", {"scale.kind": "fit"}, {"fit/PBE/L_N/alpha": 0.3,
                                                                   "nan": float("nan")}, [tmp_path / "fit.json"])
    run = client(uri).get_run(fit)
    assert run.info.status == "FINISHED" and run.data.metrics == {"fit/PBE/L_N/alpha": 0.3}
    assert [a.path for a in client(uri).list_artifacts(fit)] == ["fit.json"]
    with pytest.raises(TrackingError, match="not found"):
        experiment_runs(uri, "nope")
