"""``mlip-pretrain``: the command-line entry point.

Each command is a handful of build calls into the package that owns the stage; user
mistakes (bad config, missing files, foreign folders) print one line naming the file,
key or value at fault and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlip-pretrain", description=__doc__.splitlines()[0])
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
    d = sub.add_parser("demo", help="end-to-end demo on the shipped sample data")
    d.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    d.add_argument("--workers", type=int, default=2)
    return p


def cmd_data_build(args) -> int:
    """Run a data build and print the summary."""
    from data_pipeline.build import build, report
    from data_pipeline.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    report(build(recipe, args.out, workers=args.workers, strict=args.strict))
    print(f"shards, manifest.json and rejects.jsonl are in {Path(args.out).resolve()}")
    return 0


def cmd_data_inspect(args) -> int:
    """Print a shard folder's summary table (or its manifest as JSON)."""
    from data_pipeline.build import report
    from data_pipeline.manifest import read_manifest

    manifest = read_manifest(args.folder)
    if args.json:
        print(json.dumps(manifest, indent=1))
    else:
        report(manifest)
    return 0


def cmd_demo(args) -> int:
    """Build shards from the shipped multi-fidelity sample and inspect them."""
    from data_pipeline.build import build, report
    from data_pipeline.recipe import load_recipe

    recipe = load_recipe(REPO / "configs" / "data" / "sample.yaml")
    out = Path(args.out) / "shards"
    print(f"[demo] building shards from {recipe.root}/data/sample into {out}", flush=True)
    report(build(recipe, out, workers=args.workers))
    return 0


COMMANDS = {("data", "build"): cmd_data_build, ("data", "inspect"): cmd_data_inspect,
            ("demo", None): cmd_demo}


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the command; user errors exit 2 with one line."""
    from data_pipeline.build import BuildError
    from data_pipeline.config import ConfigError
    from data_pipeline.manifest import ManifestError
    from data_pipeline.shards import ShardError
    from data_pipeline.sources import SourceParseError

    parser = _parser()
    # dotted overrides (key.sub=value) may stand anywhere among the options
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if e.startswith("-") or "=" not in e]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = extra
    command = COMMANDS[(args.command, getattr(args, "data_command", None))]
    try:
        return command(args)
    except (ConfigError, BuildError, ManifestError, ShardError, SourceParseError) as err:
        print(f"mlip-pretrain: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
