"""``mlip-pretrain release uncertainty``: give an existing release calibrated uncertainty.

For a release made without it (format 2, or ``--uncertainty none``), or to fit it again:
LLPR needs the release's training shards (``--data``, checked against the content hash
the release records) and held-out shards (``--held-out``: calibrated on the even half,
scored on the odd half, as ``release create`` does with a run's ``eval.folder``). The new
release is the old one with the uncertainty tensors added to ``model.safetensors``,
``config.json`` at the current format with its ``uncertainty`` record, ``metrics.json``
and the card's "Held-out metrics" and "Uncertainty" sections from an ``eval`` on
``--held-out``, ``reliability.png``, and new checksums; every other file is copied as it
was. Like ``release create``, it is staged under a temporary name: a failure leaves
nothing behind, and a release is never overwritten.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from common.atomic import write_atomic
from pretrain.release.format import (CARD, CONFIG, FORMAT_VERSION, METRICS, RELIABILITY, SUMS, WEIGHTS,
                                     ReleaseError, staged, write_sums, write_weights)

REWRITTEN = (CONFIG, WEIGHTS, METRICS, CARD, RELIABILITY, SUMS)


def add_uncertainty(release: str | Path, out: str | Path, data: str | Path, held_out: str | Path,
                    method: str = "auto", progress: bool = True) -> Path:
    """Write ``release`` with calibrated uncertainty to ``out`` (see the module docstring)."""
    from data_pipeline.manifest import read_manifest  # noqa: PLC0415
    from pretrain.release.create import scored_held_out  # noqa: PLC0415
    from pretrain.release.loader import load_release  # noqa: PLC0415
    from pretrain.uncertainty.fit import fit_uncertainty  # noqa: PLC0415

    release, out = Path(release), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ReleaseError(f"{out}: exists and is not empty; choose a new --out (a release is never overwritten)")
    trained = load_release(release)
    config = dict(trained.release_config)
    recorded = (config.get("data") or {}).get("content_hash")
    found = read_manifest(data)["content_hash"]
    if recorded and recorded != found:
        raise ReleaseError(f"--data {data}: content hash {found[:12]} is not the release's training data "
                           f"({recorded[:12]}, {CONFIG}); LLPR needs the data the model was trained on")
    uq = fit_uncertainty(trained, method, train_folder=data, held_out=held_out, progress=progress)
    if uq is None:
        raise ReleaseError("release uncertainty: --method none adds nothing; copy the release instead")
    held, curves = scored_held_out(trained, held_out, uq, progress)
    config.update(format_version=FORMAT_VERSION, uncertainty=uq,
                  model={**config["model"], "uncertainty": uq["method"]})
    with staged(out) as tmp:
        for path in release.iterdir():
            if path.is_file() and path.name not in REWRITTEN:
                shutil.copy2(path, tmp / path.name)
        write_weights(tmp, trained.potential)
        write_atomic(tmp / CONFIG, json.dumps(config, indent=1) + "\n")
        write_atomic(tmp / METRICS, json.dumps(held, indent=1) + "\n")
        if curves:
            from pretrain.uncertainty.metrics import reliability_plot  # noqa: PLC0415

            reliability_plot(curves, tmp / RELIABILITY)
        write_atomic(tmp / CARD, _card(release / CARD, config, held, uq))
        write_sums(tmp)
    return out


def _card(old: Path, config: dict, held: dict, uq: dict) -> str:
    """The old card with its held-out metrics and uncertainty sections made anew."""
    from pretrain.release.card import metrics_lines, uncertainty_card_lines  # noqa: PLC0415

    text = old.read_text() if old.is_file() else f"# {config.get('name', 'release')}\n"
    text = _replace_section(text, "## Held-out metrics", "\n".join(["## Held-out metrics", "",
                                                                     *metrics_lines(held, config), ""]))
    return _replace_section(text, "## Uncertainty", "\n".join(uncertainty_card_lines(uq, held)),
                            before="## Robustness")


def _replace_section(text: str, header: str, section: str, before: str = "## Known limits") -> str:
    """``text`` with the Markdown section ``header`` (up to the next ``## ``) replaced by
    ``section``, or ``section`` inserted before ``before`` (else at the end)."""
    start = text.find(header + "\n")
    if start >= 0:
        end = text.find("\n## ", start + len(header))
        end = len(text) if end < 0 else end + 1
        return text[:start] + section.rstrip("\n") + "\n\n" + text[end:]
    at = text.find(before + "\n")
    if at < 0:
        return text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    return text[:at] + section.rstrip("\n") + "\n\n" + text[at:]
