"""``mlip-pretrain``: the command-line entry point.

Each command is a handful of build calls into the package that owns the stage; user
mistakes (bad config, missing files, foreign folders) print one line naming the file,
key or value at fault and exit with status 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from launch.parsers import build_parser


def cmd_data_build(args) -> int:
    """Run a data build and print the summary."""
    from data_pipeline.build import build, report
    from data_pipeline.build.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    report(build(recipe, args.out, workers=args.workers, strict=args.strict))
    print(f"shards, manifest.json and rejects.jsonl are in {Path(args.out).resolve()}")
    return 0


def cmd_data_inspect(args) -> int:
    """Print a shard folder's summary table (or its manifest as JSON); with ``--plots`` also
    write its coverage figures."""
    from data_pipeline.build import report
    from data_pipeline.manifest import read_manifest

    manifest = read_manifest(args.folder)
    if args.json:
        print(json.dumps(manifest, indent=1))
    else:
        report(manifest)
    if args.plots is not None:
        from data_pipeline.coverage_plots import write_plots
        from data_pipeline.coverage_report import coverage_of

        paths = write_plots(coverage_of(manifest, f"{Path(args.folder) / 'manifest.json'}"), args.plots)
        print(f"{len(paths)} coverage figures in {Path(args.plots).resolve()}")
    return 0


def cmd_data_verify(args) -> int:
    """Check a shard folder's files against its manifest."""
    from data_pipeline.stream.dataset import ShardedDataset

    n = ShardedDataset(args.folder).verify(progress=True)
    print(f"{n} shard(s) in {args.folder} match the manifest (size and sha256)")
    return 0


def cmd_data_stream(args) -> int:
    """Stream ``--epochs`` epochs through the loader and print throughput per epoch."""
    return _stream_epochs(args.folder, args.overrides, args.epochs)


def _stream_epochs(folder: str, overrides: list[str], epochs: int) -> int:
    """Build the loader of ``folder`` (config ``overrides``) and report ``epochs`` epochs."""
    from common.config import apply_overrides, from_dict
    from data_pipeline.stream import LoaderConfig, build_loader, stream_epoch

    cfg = from_dict(LoaderConfig, apply_overrides({"folder": folder}, overrides))
    stream = build_loader(cfg)
    try:
        for _ in range(epochs):
            r = stream_epoch(stream, progress=True)
            print(f"epoch {r['epoch']}: {r['batches']} batches, {r['structures']} structures, "
                  f"{r['atoms']} atoms, {r['edges']} edges in {r['seconds']:.2f} s "
                  f"({r['structures_per_s']:.0f} structures/s, {r['edges_per_s']:.0f} edges/s, "
                  f"waited {100 * r['wait_fraction']:.0f}%); atoms seen per fidelity: "
                  f"{r['atoms_seen']}")
    finally:
        stream.close()
    return 0


def cmd_model_info(args) -> int:
    """Print a model config's measured size and cost."""
    from models.info import describe

    print(describe(args.config, args.overrides))
    return 0


def cmd_train(args) -> int:
    """Run (or resume) a training run; rank 0 prints where its outputs are."""
    from launch.train import run_training
    from pretrain.preemption import EXIT_PREEMPTED, Preempted

    try:
        metrics = run_training(args.config, args.overrides, resume=args.resume, stop_at=args.stop_at,
                               time_limit=args.time_limit)
    except Preempted as stop:  # a checkpoint of this step exists: exit 75, resumable
        print(f"mlip-pretrain: preempted (rank {os.environ.get('RANK', 0)}): {stop}", file=sys.stderr)
        return EXIT_PREEMPTED
    if int(os.environ.get("RANK", 0)) == 0:
        shown = {k: round(v, 5) for k, v in metrics.items() if k.startswith(("train/loss", "val/"))}
        print(f"[train] done: {json.dumps(shown)}")
    return 0


def cmd_scale(args) -> int:
    """``scale run | fit``."""
    from launch import scale

    if args.scale_command == "run":
        return scale.run_study(args.study, args.launcher, args.overrides, args.point, args.submit)
    return scale.fit_command(args.study, args.metric, args.tracking_uri, args.out, args.bootstrap)


def cmd_launch(args) -> int:
    """``launch slurm | ray``."""
    if args.launch_command == "slurm":
        from launch.slurm import launch_command
    else:
        from launch.ray_train import launch_command
    return launch_command(args)


def cmd_eval(args) -> int:
    """Evaluate a trained model on a shard folder: table, metrics.json, parity plots."""
    import torch

    from pretrain.evaluate import evaluate, join_group, table, uncertainty_table, write_outputs
    from pretrain.release.loader import load_model
    from pretrain.release.robustness import write_robustness
    from data_pipeline.leakage import leakage_table
    from pretrain.overlap import OverlapError, held_out_overlap
    from pretrain.strata import strata_table
    from pretrain.target_metrics import target_table

    rank, _, joined = join_group()
    try:
        trained = load_model(args.model, ema=not args.no_ema)
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
        model = trained.potential.double() if args.dtype == "float64" else trained.potential
        calibration = ((trained.release_config or {}).get("uncertainty") or {}).get("calibration")
        overlap = held_out_overlap(trained, args.data, args.train_data)
        if args.exclude_leaked and overlap is None:
            raise OverlapError("--exclude-leaked needs the training data: pass --train-data FOLDER")
        exclude = overlap["leaked"] if overlap is not None and args.exclude_leaked else None
        metrics = evaluate(model, args.data, args.max_atoms, True, device, args.dtype, direct=trained.direct,
                           calibration=calibration, exclude=exclude)
        if overlap is not None:
            overlap.pop("leaked")
            overlap["excluded"] = bool(args.exclude_leaked)
            metrics["leakage"] = overlap
        if rank == 0:
            out = Path(args.out or Path("out") / "eval" / f"{Path(args.model).name}--{Path(args.data).name}")
            source = {"path": str(trained.path.resolve()), "kind": trained.kind, "ema": trained.ema,
                      "step": trained.step, "forces": trained.forces}
            files = write_outputs(metrics, source, out)
            if args.robustness:
                files += write_robustness(trained, out)
            print(table(metrics))
            print(strata_table(metrics))
            if metrics.get("targets"):
                print(target_table(metrics))
            if "leakage" in metrics:
                print(leakage_table(metrics["leakage"]))
            if "uncertainty" in metrics:
                print(uncertainty_table(metrics["uncertainty"]))
            print(f"[eval] {trained.kind} {trained.path} ({'EMA' if trained.ema else 'raw'} weights, "
                  f"{trained.forces} forces) on {args.data}: {', '.join(str(f) for f in files)}")
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def cmd_release(args) -> int:
    """``release create | uncertainty | verify | export | ir``."""
    if args.release_command == "create":
        from pretrain.release.create import create

        folder = create(args.source, args.out, name=args.name, license=args.license,
                        evaluate_held_out=not args.no_eval, register=not args.no_register,
                        uncertainty=args.uncertainty, calibration=args.calibration)
        print(f"[release] {folder}: {', '.join(sorted(p.name for p in folder.iterdir()))}")
        return 0
    if args.release_command == "uncertainty":
        from pretrain.release.add_uncertainty import add_uncertainty

        folder = add_uncertainty(args.release, args.out, args.data, args.held_out, args.method)
        print(f"[release] {folder}: {', '.join(sorted(p.name for p in folder.iterdir()))}")
        return 0
    if args.release_command == "verify":
        from pretrain.release.verify import verify_command

        return verify_command(args.release, args.data, args.tolerance, args.allow_fragile)
    if args.release_command == "ir":
        from pretrain.release.spectra import ir_spectrum, summary_line

        result = ir_spectrum(args.release, args.reference, args.out, args.temperature, args.timestep,
                             args.steps, runs=args.runs, seed=args.seed)
        print(f"[ir] {summary_line(result)}; {args.out}")
        return 0
    from pretrain.release.export import export_command

    return export_command(args.release, args.format, args.out, args.dtype, args.aoti)


def cmd_lammps(args) -> int:
    """A LAMMPS input with a release as its pair style (``lammps_glue/``, GPL-2.0)."""
    from lammps_glue.run import lammps_command

    return lammps_command(args)


def cmd_demo(args) -> int:
    """The whole life cycle on the shipped QM dataset (``launch/demo.py``)."""
    from launch.demo import run_demo

    run_demo(args.out, workers=args.workers, quick=args.quick)
    return 0


COMMANDS = {("data", "build"): cmd_data_build, ("data", "inspect"): cmd_data_inspect,
            ("data", "verify"): cmd_data_verify, ("data", "stream"): cmd_data_stream,
            ("model", "info"): cmd_model_info, ("train", None): cmd_train, ("demo", None): cmd_demo,
            ("eval", None): cmd_eval, ("release", "create"): cmd_release,
            ("release", "verify"): cmd_release, ("release", "export"): cmd_release,
            ("release", "uncertainty"): cmd_release,
            ("scale", "run"): cmd_scale, ("scale", "fit"): cmd_scale,
            ("launch", "slurm"): cmd_launch, ("launch", "ray"): cmd_launch, ("lammps", None): cmd_lammps}


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the command; user errors exit 2 with one line."""
    from common.errors import EXIT_USER_ERROR, UserError

    parser = build_parser()
    # dotted overrides (key.sub=value) may stand anywhere among the options
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if e.startswith("-") or "=" not in e]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = extra
    sub = (getattr(args, "data_command", None) or getattr(args, "model_command", None)
           or getattr(args, "release_command", None) or getattr(args, "scale_command", None)
           or getattr(args, "launch_command", None))
    command = COMMANDS[(args.command, sub)]
    try:
        return command(args)
    except UserError as err:  # a mistake the user can mend: one line, no traceback
        rank = os.environ.get("RANK")
        print(f"mlip-pretrain: error{f' (rank {rank})' if rank not in (None, '0') else ''}: {err}",
              file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
