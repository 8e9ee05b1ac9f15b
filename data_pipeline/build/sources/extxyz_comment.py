"""The comment line of an extended-XYZ frame -> ``atoms.info``, as ASE 3.29 makes it.

Part of the fast extxyz reader (:mod:`data_pipeline.build.sources.extxyz`): the key=value
tokenizer and the value conversion (numbers, 3x3 keys, bools, ``_JSON``), kept apart
because the rules are many and each is tested against ASE's own parser.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import numpy as np

# Comment lines made only of key=value / key="value" pairs separated by whitespace take one
# regex; anything else (bare keys, other quotes, escapes, empty values) takes the token loop.
_BARE = r"""[^\s"'{\[\\=]+"""
_PAIR = re.compile(rf'({_BARE})=(?:"([^"\\]+)"|({_BARE}))')
_TOKEN = re.compile(
    r"""(\s+)|(=)|(\\$)|"((?:[^"\\]|\\.)*)"?|'((?:[^'\\]|\\.)*)'?"""
    r"""|\{((?:[^}\\]|\\.)*)\}?|\[((?:[^\]\\]|\\.)*)\]?|((?:[^\s="'{\[\\]|\\.)+)""",
    re.S,
)
_ESCAPED = re.compile(r"\\(.)", re.S)
_WORDS = re.compile(r"[^\s,]+")
# Words on which numpy's str->int / str->float casts surely agree with int() / float();
# other words take numpy's own casts, exactly as ASE does.
_INT = re.compile(r"[-+]?[0-9]{1,18}")
_NUMBER = re.compile(
    r"[-+]?(?:(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+)|" + _INT.pattern
)
_NUMERIC_CHARS = re.compile(r"[-+0-9.eE\s,]*")
# A character int() and float() never accept (they take signs, digits, "_", ".", exponents,
# inf/infinity/nan, non-ASCII digits): a word holding one is not a number.
_NOT_NUMERIC = re.compile(r"[^-+0-9_.eEiInNfFtTyYaA\s,\x80-\U0010ffff]")
_INFO_BOOLS = {"T": True, "F": False, "true": True, "false": False,
               "True": True, "False": False, "TRUE": True, "FALSE": False}
_PBC_STRINGS = {" ".join(k): [_INFO_BOOLS[c] for c in k] for k in itertools.product("TF", repeat=3)}

def parse_comment(line: str, tables: dict[str, Any]) -> dict[str, Any]:
    """``atoms.info`` as ASE's ``key_val_str_to_dict`` makes it from a comment line."""
    if not line:
        return {}
    return {key: _info_value(key, value, tables) for key, value in _split_pairs(line)}


def _split_pairs(line: str) -> list[tuple[str, str]]:
    """(key, raw value) pairs; a key without ``=`` gets "T" (ASE's default of True)."""
    parts = _PAIR.split(line)  # [before, key, quoted, bare, between, key, ..., after]
    if not parts[0] and not parts[-1] and all(map(str.isspace, parts[4:-1:4])):
        values = [quoted or bare for quoted, bare in zip(parts[2::4], parts[3::4])]
        return list(zip(parts[1::4], values))
    # Same states as ASE's character loop, stepped a token at a time: quotes and escapes
    # copy text verbatim, whitespace ends a pair unless nothing was read into it yet,
    # "=" starts a value, and a pair that is still empty joins "key = value" up.
    pairs = [[""]]
    for match in _TOKEN.finditer(line):
        kind = match.lastindex
        if kind == 1:
            if pairs[-1][-1]:
                pairs.append([""])
        elif kind == 2:
            if pairs[-1] == [""]:
                del pairs[-1]
            pairs[-1].append("")  # IndexError on a leading "=", where ASE fails too
        elif kind > 3:  # kind 3 is a lone trailing backslash: escapes nothing
            text = match.group(kind)
            pairs[-1][-1] += _ESCAPED.sub(r"\1", text) if "\\" in text else text
    return [(p[0], "=".join(p[1:]) if len(p) > 1 else "T") for p in pairs]


def _info_value(key: str, value: str, tables: dict[str, Any]) -> Any:
    """One info value converted as ASE does: numbers, 3x3 keys, bools, ``_JSON``."""
    if key.lower() in tables["unprocessed"]:
        return value
    if key not in tables["special"]:  # shortcuts for the common scalars and strings
        if _INT.fullmatch(value):
            return np.int_(int(value))
        if _NUMBER.fullmatch(value):
            return np.float64(float(value))
        if value in _PBC_STRINGS:
            return list(_PBC_STRINGS[value])
        if ":" in value and not value.startswith("_JSON "):
            return value  # e.g. Properties: never a number or a bool
    number = _number(value)
    if number is not None:
        value = number[0] if len(number) == 1 else number
    if key in tables["special"]:
        if not isinstance(value, np.ndarray) or value.shape != (9,):
            raise ValueError(f"{key} must be 9 numbers, got {value!r}")
        return value.reshape((3, 3), order="F")  # a fresh array: no copy needed
    if isinstance(value, str):
        try:
            flags = [_INFO_BOOLS[word] for word in _WORDS.findall(value)]
            value = flags[0] if len(flags) == 1 else flags
        except KeyError:
            if value.startswith("_JSON "):
                decoded = json.loads(value.replace("_JSON ", "", 1))
                array = np.array(decoded)
                value = array if array.dtype.kind in "ifb" else decoded
    return value


def _number(value: str) -> np.ndarray | None:
    """The value's words as an int array, else a float array, else None (ASE's numpy casts)."""
    if _NUMERIC_CHARS.fullmatch(value):
        # On words of these characters int() / float() accept and give what numpy's
        # casts do; a word with "." or an exponent fails the int cast, so floats it is.
        words = value.replace(",", " ").split()
        try:
            if "." in value or "e" in value or "E" in value:
                return np.array(list(map(float, words)), dtype=float)
            return np.array(list(map(int, words)), dtype=int)
        except (ValueError, OverflowError):
            pass  # e.g. "1e" or a 20-digit int: numpy's casts below decide
    words = _WORDS.findall(value)
    if _NOT_NUMERIC.search(value) or any(map(_INFO_BOOLS.__contains__, words)):
        return None  # spares the two failing numpy casts
    try:
        try:
            return np.array(words, dtype=int)
        except (ValueError, OverflowError):
            return np.array(words, dtype=float)
    except (ValueError, OverflowError):
        return None
