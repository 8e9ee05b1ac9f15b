"""``mlip-pretrain launch slurm``: an sbatch script for a multi-node training job.

The script runs one ``torchrun`` per node (``srun --ntasks-per-node=1``) that joins a c10d
rendezvous on the job's first node and starts the node's ranks (NCCL on GPUs, gloo on
CPUs; ``pretrain.engine.init_distributed`` picks it). Each rank's output goes to its own
file under ``<out>/slurm/<job>-<restart>/`` (torchrun ``--redirects``), and the job's
under ``<out>/slurm/job-<job>.out``.

Preemption (``pretrain/preemption.py``): ``--signal=USR1@<before>`` makes SLURM send
SIGUSR1 to every process of the job step that many seconds before the time limit
(``scancel --signal=USR1 <job>`` does the same at once). The launchers ignore it
(``trap '' USR1`` before ``exec torchrun``: an ignored signal stays ignored through exec),
the ranks stop together at the next step boundary with a checkpoint and exit 75, and rank 0
writes ``<out>/PREEMPTED``. The script then requeues the job (``--requeue`` allows it; at
most ``--max-requeues`` times, counted by ``SLURM_RESTART_COUNT``), and the requeued job
runs the same command, which always passes ``--resume``: it continues from the newest
complete checkpoint (or starts at step 0 when there is none). Preemption by SLURM itself
(SIGTERM, then SIGKILL after ``KillWait``) reaches the ranks too; with ``PreemptMode=
REQUEUE`` SLURM requeues the job itself.
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys
from pathlib import Path

from common.config import ConfigError


@dataclasses.dataclass
class SlurmJob:
    """What the sbatch script asks SLURM for and runs."""

    config: str
    """Training config YAML (its ``out`` is where checkpoints, logs and PREEMPTED go)."""
    overrides: list[str] = dataclasses.field(default_factory=list)
    """Dotted config overrides, passed on to ``mlip-pretrain train``."""
    nodes: int = 1
    gpus_per_node: int = 0
    """GPUs per node; 0: a CPU job (gloo)."""
    procs_per_node: int | None = None
    """Ranks per node; default: one per GPU (one on a CPU node)."""
    partition: str | None = None
    time: str | None = None
    """SLURM time limit (``[D-]HH:MM:SS``)."""
    account: str | None = None
    signal_before: int = 120
    """Seconds before the time limit at which SLURM sends SIGUSR1 (a checkpoint must fit)."""
    max_requeues: int = 20
    port: int = 29500
    """Rendezvous port on the first node."""
    job_name: str = "mlip-pretrain"
    python: str = sys.executable

    def __post_init__(self):
        if self.nodes < 1 or self.gpus_per_node < 0 or (self.procs_per_node or 1) < 1:
            raise ConfigError(f"launch slurm: --nodes {self.nodes}, --gpus-per-node {self.gpus_per_node}, "
                             f"--procs-per-node {self.procs_per_node}: expected >= 1, >= 0, >= 1")
        if self.signal_before < 1:
            raise ConfigError(f"launch slurm: --signal-before {self.signal_before}: expected >= 1 second")

    @property
    def ranks_per_node(self) -> int:
        return self.procs_per_node or max(self.gpus_per_node, 1)


def _out(job: SlurmJob) -> Path:
    """The run's output folder, from the validated config (a bad key fails here, at once)."""
    from pretrain.config import load_train_config  # noqa: PLC0415

    return Path(load_train_config(job.config, job.overrides).out).resolve()


def render(job: SlurmJob) -> str:
    """The sbatch script of ``job`` (run from this directory: relative paths in the config
    mean what they mean here)."""
    out = _out(job)
    q = shlex.quote
    head = [f"#SBATCH --job-name={job.job_name}", f"#SBATCH --nodes={job.nodes}",
            "#SBATCH --ntasks-per-node=1", "#SBATCH --requeue", "#SBATCH --open-mode=append",
            f"#SBATCH --signal=USR1@{job.signal_before}", f"#SBATCH --output={out}/slurm/job-%j.out"]
    head += [f"#SBATCH --gpus-per-node={job.gpus_per_node}"] * (job.gpus_per_node > 0)
    head += [f"#SBATCH --{k}={v}" for k, v in (("partition", job.partition), ("time", job.time),
                                               ("account", job.account)) if v]
    train = " ".join(q(a) for a in ["-m", "launch.cli", "train", str(Path(job.config).resolve()),
                                    *job.overrides, f"out={out}", "--resume"])
    accelerator = "cuda" if job.gpus_per_node else "cpu"
    return f"""#!/bin/bash
# mlip-pretrain training job, rendered by 'mlip-pretrain launch slurm' (see launch/slurm.py)
{chr(10).join(head)}
set -u
OUT={q(str(out))}
mkdir -p "$OUT/slurm"
cd {q(str(Path.cwd()))}
export DS_ACCELERATOR={accelerator} OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-1}}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
ATTEMPT="$SLURM_JOB_ID-${{SLURM_RESTART_COUNT:-0}}"
rm -f "$OUT/PREEMPTED"
echo "[slurm] job $SLURM_JOB_ID attempt ${{SLURM_RESTART_COUNT:-0}}: {job.nodes} node(s) x \
{job.ranks_per_node} rank(s), rendezvous $HEAD_NODE:{job.port}"
# one launcher per node; it ignores SIGUSR1 (the ranks act on it), torchrun restarts nothing
srun --ntasks-per-node=1 --kill-on-bad-exit=0 bash -c 'trap "" USR1; exec "$@"' launcher \\
  {q(job.python)} -m torch.distributed.run --nnodes={job.nodes} --nproc-per-node={job.ranks_per_node} \\
  --rdzv-backend=c10d --rdzv-endpoint="$HEAD_NODE:{job.port}" --rdzv-id="$SLURM_JOB_ID" \\
  --max-restarts=0 --log-dir="$OUT/slurm/$ATTEMPT" --redirects=3 --tee=3 \\
  {train}
STATUS=$?
if [ -f "$OUT/PREEMPTED" ]; then
  if [ "${{SLURM_RESTART_COUNT:-0}}" -lt {job.max_requeues} ]; then
    echo "[slurm] preempted with a checkpoint ($(cat "$OUT/PREEMPTED")); requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  echo "[slurm] preempted, but requeued {job.max_requeues} times already: not again"
  exit 75
fi
echo "[slurm] training exited with status $STATUS"
exit $STATUS
"""


def submit(script: str) -> str:
    """``sbatch`` the script (from stdin); returns the job id."""
    done = subprocess.run(["sbatch", "--parsable"], input=script, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"sbatch failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip().split(";")[0]


def launch_command(args) -> int:
    """``mlip-pretrain launch slurm``: print the script, or submit it with ``--submit``."""
    job = SlurmJob(args.config, args.overrides, args.nodes, args.gpus_per_node, args.procs_per_node,
                   args.partition, args.time, args.account, args.signal_before, args.max_requeues,
                   args.port)
    script = render(job)
    (_out(job) / "slurm").mkdir(parents=True, exist_ok=True)  # SLURM opens --output before the script runs
    if not args.submit:
        print(script, end="")
        return 0
    job_id = submit(script)
    print(f"[slurm] submitted job {job_id}: outputs in {_out(job)} (job log slurm/job-{job_id}.out)")
    return 0
