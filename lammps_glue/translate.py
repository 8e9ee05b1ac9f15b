"""An ordinary LAMMPS input, with ``pair_style mlip`` standing for the release, as two
LAMMPS input parts: everything up to the ``pair_coeff`` that names the elements (plus the
``fix external`` that carries the release), then the rest. The callback is registered
between the two (LAMMPS needs the fix to exist, and the callback set before the first
``run`` or ``minimize``).

The input is otherwise untouched: variables, loops, ``include`` and ``read_data`` work as
in ``lmp -in``. Only one ``pair_style mlip`` and one ``pair_coeff * * El ...`` may appear
(one element per atom type, in type order; ``NULL`` is not allowed: every atom belongs to
the release).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UserError

FIX_ID = "mlip_release"


class LammpsInputError(UserError):
    """An input file the glue cannot run (names the file, line and what to change)."""


@dataclass
class Translated:
    """The two parts of the input and what the ``pair_coeff`` line named."""

    before: list[str]  # up to and including the fix external lines
    after: list[str]
    elements: list[str]  # one per atom type, type 1 first
    lines_read: int = 0
    notes: list[str] = field(default_factory=list)


def logical_lines(text: str) -> list[tuple[int, str]]:
    """``(first line number, line)`` with ``&`` continuations joined, as LAMMPS reads them."""
    out, buf, start = [], "", None
    for number, raw in enumerate(text.splitlines(), start=1):
        if start is None:
            start = number
        stripped = raw.rstrip()
        if stripped.endswith("&"):
            buf += stripped[:-1] + " "
            continue
        out.append((start, buf + raw))
        buf, start = "", None
    if start is not None:
        out.append((start, buf))
    return out


def _words(line: str) -> list[str]:
    return line.split("#", 1)[0].split()


def translate(path: str | Path, cutoff: float, text: str | None = None) -> Translated:
    """The input at ``path`` (or ``text``, named ``path`` in errors) split around the
    release's ``pair_coeff``; ``cutoff`` (A) is the model's, given to ``pair_style zero``
    so LAMMPS keeps neighbour lists and ghost atoms of that reach."""
    path = Path(path)
    if text is None:
        try:
            text = path.read_text()
        except OSError as e:
            raise LammpsInputError(f"{path}: cannot read the LAMMPS input ({e.strerror})") from e
    before, after, elements = [], [], None
    style_line = None
    lines = logical_lines(text)
    for number, line in lines:
        words = _words(line)
        where = f"{path}:{number}"
        if words[:1] == ["pair_style"]:
            if "mlip" in words[1:] and words[1] != "mlip":
                raise LammpsInputError(f"{where}: `{' '.join(words)}`: mlip cannot be part of a hybrid pair "
                                       "style here; use `pair_style mlip` alone")
            if words[1:2] == ["mlip"]:
                if style_line is not None:
                    raise LammpsInputError(f"{where}: a second `pair_style mlip` (first at line {style_line})")
                if len(words) > 2:
                    raise LammpsInputError(f"{where}: `pair_style mlip` takes no arguments (got "
                                           f"{' '.join(words[2:])}); the release, fidelity, charge and spin "
                                           "are options of `mlip-pretrain lammps`")
                style_line = number
                (after if elements is not None else before).append(f"pair_style zero {cutoff:.10g}")
                continue
        if words[:1] == ["pair_coeff"] and style_line is not None and elements is None:
            if words[1:3] != ["*", "*"] or len(words) < 4:
                raise LammpsInputError(f"{where}: `{' '.join(words)}`: the release's pair_coeff is "
                                       "`pair_coeff * * El1 El2 ...` (one element per atom type)")
            elements = words[3:]
            bad = [e for e in elements if not _is_element(e)]
            if bad:
                raise LammpsInputError(f"{where}: {', '.join(bad)}: not element symbols (one element per atom "
                                       "type, in type order, e.g. `pair_coeff * * Cu Ni`)")
            before += ["pair_coeff * *", f"fix {FIX_ID} all external pf/callback 1 1",
                       f"fix_modify {FIX_ID} energy yes virial yes"]
            continue
        (after if elements is not None else before).append(line)
    if style_line is None:
        raise LammpsInputError(f"{path}: no `pair_style mlip` line: write `pair_style mlip` and "
                               "`pair_coeff * * El1 El2 ...` where the release stands in the input")
    if elements is None:
        raise LammpsInputError(f"{path}: `pair_style mlip` (line {style_line}) has no `pair_coeff * * El1 El2 ...` "
                               "after it naming one element per atom type")
    return Translated(before, after, elements, len(lines))


def _is_element(symbol: str) -> bool:
    from ase.data import atomic_numbers  # noqa: PLC0415

    return symbol in atomic_numbers and symbol != "X"
