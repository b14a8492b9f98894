"""The parity calibration set: fixed text shipped inside the package, so every install checks the same inputs.

``calibration.jsonl`` (package data, beside this module) holds one input per line, in order:

* a JSON object ``{"instruction": "...", "text": "..."}`` is the pair ``[instruction, text]``;
* a JSON string is a bare text (pooled over all its tokens, no instruction).

Nothing else is allowed: no blank lines, no other keys. The text was written for this project (about 390 inputs in
a fixed, shuffled order): single words, sentences and paragraphs on many topics under many INSTRUCTOR
instructions; many languages and scripts, emoji, numbers, URLs, code, math and odd whitespace; four texts of
750+ words (past 512 tokens for any T5 tokenizer); and the edge cases of docs/design.md section 4 (an empty
instruction, a one-character instruction, an empty text, a bare string, an instruction longer than its text).
Invisible characters are written as ``\\uXXXX`` escapes; split the file on ``"\\n"`` only (never
``str.splitlines``, which also breaks at U+2028 and U+0085). Any edit changes :func:`calibration_sha256`, which
keys the dispatcher's cached parity results.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib import resources

__all__ = ["CALIBRATION_FILE", "CalibrationError", "calibration_pairs", "calibration_sha256"]

CALIBRATION_FILE = "calibration.jsonl"


class CalibrationError(RuntimeError):
    """The shipped calibration file is missing or malformed: the installation is broken."""


def _broken(problem: str) -> CalibrationError:
    return CalibrationError(f"fastinstructor/{CALIBRATION_FILE} {problem}; reinstall fastinstructor")


@lru_cache(maxsize=1)
def _raw() -> bytes:
    """The file's bytes, through importlib.resources: a source checkout, an installed wheel or a zip."""
    try:
        return resources.files(__package__).joinpath(CALIBRATION_FILE).read_bytes()
    except OSError as err:  # FileNotFoundError, or an unreadable file
        raise _broken(f"cannot be read ({type(err).__name__}: {err})") from None


@lru_cache(maxsize=1)
def _inputs() -> tuple:
    try:
        lines = _raw().decode("utf-8").split("\n")
    except UnicodeDecodeError as err:
        raise _broken(f"is not UTF-8 ({err})") from None
    if lines[-1] == "":
        lines.pop()  # the final newline
    inputs = []
    for number, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
        except ValueError as err:
            raise _broken(f"line {number} is not JSON ({err})") from None
        if isinstance(item, dict) and set(item) == {"instruction", "text"}:
            item = (item["instruction"], item["text"])
        parts = item if isinstance(item, tuple) else (item,)
        if not all(isinstance(part, str) for part in parts):
            raise _broken(f'line {number} is neither a string nor {{"instruction": str, "text": str}}')
        try:
            "".join(parts).encode("utf-8")
        except UnicodeEncodeError:
            raise _broken(f"line {number} holds a lone surrogate") from None
        inputs.append(item)
    if not inputs:
        raise _broken("is empty")
    return tuple(inputs)


def calibration_pairs() -> list:
    """The calibration inputs as the tokenizer takes them: ``[instruction, text]`` lists and bare strings, in
    file order. Read once; each call returns a fresh list, so a caller may change it."""
    return [list(item) if isinstance(item, tuple) else item for item in _inputs()]


def calibration_sha256() -> str:
    """The sha256 (hex) of the calibration file's bytes: names the exact set for caches and reports."""
    return hashlib.sha256(_raw()).hexdigest()
