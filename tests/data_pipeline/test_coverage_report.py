"""``data inspect`` on coverage: the summary, the known limits, the figures, and a manifest
from a build that predates coverage (through the CLI)."""

from __future__ import annotations

import json

from data_pipeline.coverage_report import RARE_STRUCTURES, known_limits


def _cli(argv: list[str], capfd) -> tuple[int, str, str]:
    """Exit status, stdout and stderr (captured at the file descriptors: the summary
    writes to the stream it was given at import)."""
    from launch.cli import main

    capfd.readouterr()
    code = main(argv)
    out, err = capfd.readouterr()
    return code, out, err


def test_known_limits_name_the_rare_element_and_pair(coverage_built):
    _, _, m = coverage_built
    limits = known_limits(m["coverage"])
    emt = limits["EMT"]
    assert emt["rare_elements"]["O"] == 1 and emt["rare_pairs"]["O-Cu"] == 1
    assert all(n < RARE_STRUCTURES for n in emt["rare_elements"].values())
    cov = m["coverage"]["fidelities"]["EMT"]
    assert emt["nearest_distance"] == [cov["nearest_distance"]["min"], cov["nearest_distance"]["max"]]
    assert set(limits) == {"EMT", "EMT-b"}


def test_inspect_prints_coverage_and_writes_plots(coverage_built, tmp_path, capfd):
    _, folder, _ = coverage_built
    code, out, err = _cli(["data", "inspect", str(folder), "--plots", str(tmp_path / "plots")], capfd)
    assert code == 0, err
    assert "[EMT] 35 structures" in out and "rare elements: O (1)" in out
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == sorted(["pairs-EMT.png", "elements-EMT.png", "pairs-EMT-b.png", "elements-EMT-b.png",
                            "nearest_distance.png", "volume_per_atom.png", "pressure.png", "force.png"])
    for p in (tmp_path / "plots").iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_older_manifest_says_rebuild(coverage_built, tmp_path, capfd):
    _, folder, m = coverage_built
    old = {k: v for k, v in m.items() if k != "coverage"}
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    code, out, err = _cli(["data", "inspect", str(tmp_path)], capfd)
    assert code == 0 and "coverage: " in out and "rebuild the data" in out, err
    code, out, err = _cli(["data", "inspect", str(tmp_path), "--plots", str(tmp_path / "plots")], capfd)
    assert code == 2 and "Traceback" not in err
    message = [ln for ln in err.splitlines() if ln.startswith("mlip-pretrain: error")]
    assert len(message) == 1 and "no coverage statistics" in message[0] and "rebuild" in message[0]
