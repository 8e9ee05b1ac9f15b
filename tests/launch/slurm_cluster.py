"""A real single-node SLURM for tests: munged, slurmctld and slurmd on 127.0.0.1, 2 CPUs.

Everything lives in one temporary folder (its own munge key and socket, state, spool and
logs; ports picked free), so it never touches a system SLURM. Needs Debian's
``slurm-wlm`` and ``munge`` and root (slurmd starts jobs as their user); :func:`why_not`
says why a machine cannot run it, for the test's skip reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from tests.distributed import _free_port

DAEMONS = ("munged", "slurmctld", "slurmd")


def why_not() -> str | None:
    """None when a local SLURM can be started here, else the reason."""
    missing = [d for d in (*DAEMONS, "sbatch", "scontrol", "scancel") if shutil.which(d) is None
               and not Path(f"/usr/sbin/{d}").exists()]
    if missing:
        return f"SLURM not installed ({', '.join(missing)} missing; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "a local SLURM needs root (slurmd runs jobs as their user)"
    return None


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    """Start with :meth:`start`, stop with :meth:`stop`; ``env`` is what clients need."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.socket = root / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.procs: list[subprocess.Popen] = []

    def _write(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        self.conf.write_text(f"""ClusterName=test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.socket}
CredType=cred/munge
StateSaveLocation={self.root / 'state'}
SlurmdSpoolDir={self.root / 'spool'}
SlurmctldPidFile={self.root / 'slurmctld.pid'}
SlurmdPidFile={self.root / 'slurmd.pid'}
SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}
SlurmdLogFile={self.root / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")

    def start(self, timeout: float = 60) -> None:
        """Write the config, start the three daemons and wait until the node is idle."""
        self._write()
        r = self.root
        self.procs.append(subprocess.Popen(
            [_exe("munged"), "-F", "--force", f"--key-file={r / 'munge.key'}", f"--socket={self.socket}",
             f"--pid-file={r / 'munged.pid'}", f"--log-file={r / 'log' / 'munged.log'}",
             f"--seed-file={r / 'munge.seed'}"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        self._wait(lambda: self.socket.exists(), timeout, "munged")
        for cmd in ([_exe("slurmctld"), "-D", "-i", "-f", str(self.conf)],
                    [_exe("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf)]):
            self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.STDOUT))
        self._wait(lambda: "idle" in self.run("sinfo", "-h", "-o", "%t", check=False), timeout, "the node")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(f.read_text()[-1500:] for f in (self.root / "log").glob("*.log"))
                raise RuntimeError(f"local SLURM: {what} not ready (exited: {dead}); logs:\n{logs}")
            time.sleep(0.2)

    def run(self, *cmd: str, check: bool = True) -> str:
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
        return done.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, RestartCnt, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(f.split("=", 1) for f in text.split() if "=" in f)

    def stop(self) -> None:
        """Cancel what is left and end the daemons (ours, by their process objects)."""
        self.run("scancel", "--user=root", check=False)
        for p in reversed(self.procs):
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
