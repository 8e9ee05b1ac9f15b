"""The input translation: ``pair_style mlip`` + ``pair_coeff * * El ...`` become LAMMPS's
``pair_style zero`` and a ``fix external``; everything else is kept, and a bad input names
its file and line."""

from __future__ import annotations

import pytest

from lammps_glue.translate import FIX_ID, LammpsInputError, logical_lines, translate

INPUT = """units metal   # a comment
read_data cell.data
pair_style mlip
pair_coeff * * Cu &
   Ni
velocity all create 300 1
run 10
"""


def test_the_release_lines_become_zero_pair_and_fix_external():
    t = translate("in.test", 5.0, INPUT)
    assert t.elements == ["Cu", "Ni"]
    assert t.before == ["units metal   # a comment", "read_data cell.data", "pair_style zero 5",
                        "pair_coeff * *", f"fix {FIX_ID} all external pf/callback 1 1",
                        f"fix_modify {FIX_ID} energy yes virial yes"]
    assert t.after == ["velocity all create 300 1", "run 10"]


def test_continuation_lines_join_and_keep_their_first_line_number():
    assert logical_lines("a &\n b\nc") == [(1, "a   b"), (3, "c")]


@pytest.mark.parametrize("text, words", [
    ("units metal\nrun 1\n", "no `pair_style mlip`"),
    ("pair_style mlip\nrun 1\n", "has no `pair_coeff * * El1"),
    ("pair_style mlip\npair_coeff 1 1 Cu\n", "in.test:2"),
    ("pair_style mlip\npair_coeff * * Cu Xx\n", "Xx: not element symbols"),
    ("pair_style hybrid/overlay mlip zbl 1 2\n", "in.test:1"),
    ("pair_style mlip cutoff 5\n", "takes no arguments"),
    ("pair_style mlip\npair_coeff * * Cu\npair_style mlip\n", "a second `pair_style mlip`"),
])
def test_bad_inputs_name_the_file_and_line(text, words):
    with pytest.raises(LammpsInputError, match=None) as err:
        translate("in.test", 5.0, text)
    assert words in str(err.value) and "in.test" in str(err.value)


def test_a_missing_input_file_is_named(tmp_path):
    with pytest.raises(LammpsInputError, match="cannot read"):
        translate(tmp_path / "nope.in", 5.0)
