"""The shipped calibration set (fastinstructor/calibration.jsonl): it has what the parity gate needs (size, long
texts, many scripts, the edge cases of docs/design.md section 4), and it is the same set wherever the package
runs from: with or without ../shared/data, from the checkout, an installed wheel or the wheel's zip."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import unicodedata
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO

from fastinstructor import calibration
from fastinstructor.calibration import CALIBRATION_FILE, CalibrationError, calibration_pairs, calibration_sha256
from fastinstructor.tokenization import PairTokenizer, load_tokenizer

SHARED_DATA = REPO.parent / "shared" / "data"
DUMP = (
    "import json, fastinstructor, fastinstructor.calibration as c; "
    "print(json.dumps({'file': fastinstructor.__file__, 'sha256': c.calibration_sha256(), "
    "'pairs': c.calibration_pairs()}))"
)


def _dump(cwd: Path, **env: str) -> dict:
    """The calibration set as a fresh interpreter sees it (no module cache shared with this one)."""
    done = subprocess.run(
        [sys.executable, "-c", DUMP], cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def _texts() -> list[str]:
    return [item if isinstance(item, str) else item[1] for item in calibration_pairs()]


def test_file_holds_only_the_documented_forms():
    raw = (REPO / "fastinstructor" / CALIBRATION_FILE).read_bytes()
    assert len(raw) < 1_000_000 and raw.endswith(b"\n")
    assert calibration_sha256() == hashlib.sha256(raw).hexdigest()
    lines = raw.decode("utf-8").split("\n")[:-1]
    items = [json.loads(line) for line in lines]
    for line, item in zip(lines, items, strict=True):
        assert isinstance(item, str) or (isinstance(item, dict) and set(item) == {"instruction", "text"}), line
        # Invisible characters are \uXXXX escapes in the file, so it reads (and splits) as plain lines.
        assert all(c == " " or unicodedata.category(c) not in ("Cc", "Cf", "Zs", "Zl", "Zp") for c in line), line
    assert calibration_pairs() == [
        item if isinstance(item, str) else [item["instruction"], item["text"]] for item in items
    ]


def test_pairs_are_a_fresh_list_each_call():
    pairs, before = calibration_pairs(), json.dumps(calibration_pairs())
    pairs.pop()
    next(item for item in pairs if isinstance(item, list))[1] = "changed"
    assert json.dumps(calibration_pairs()) == before


def test_size_topics_and_instructions():
    pairs = calibration_pairs()
    assert 300 <= len(pairs) <= 500
    assert len({json.dumps(item) for item in pairs}) == len(pairs), "duplicate inputs"
    instructions = {item[0] for item in pairs if isinstance(item, list)}
    assert len(instructions) >= 15
    for expected in (
        "Represent the Wikipedia document for retrieval:",
        "Represent the science title:",
        "Represent the question for retrieving supporting documents:",
        "Represent the sentence for clustering:",
    ):
        assert expected in instructions
    words = [len(text.split()) for text in _texts()]
    assert sum(n == 1 for n in words) >= 20  # single words
    assert sum(4 <= n <= 30 for n in words) >= 150  # short sentences
    assert sum(60 <= n <= 200 for n in words) >= 30  # paragraphs
    text = " ".join(_texts()).lower()
    for topic in ("court", "goal", "oven", "function", "interest rate", "patient", "sea level", "emissions"):
        assert topic in text, topic


def test_scripts_symbols_and_whitespace():
    text = "".join(_texts())
    names = {unicodedata.name(c, "").split(" ")[0] for c in text}
    scripts = {"CJK", "HIRAGANA", "KATAKANA", "HANGUL", "CYRILLIC", "ARABIC", "HEBREW", "DEVANAGARI", "GREEK"}
    scripts |= {"THAI", "BENGALI", "TAMIL"}
    assert scripts <= names, scripts - names
    for accented in "äöüßéèçñáíóúãąłźıšžđăư":
        assert accented in text.lower(), accented
    assert sum(ord(c) >= 0x1F300 for c in text) >= 20  # emoji
    for piece in ("https://", "@example.com", "def ", "SELECT ", "fn main", "∫", "√", "²", "€", "%", "3.14159"):
        assert piece in text, piece
    for odd in ("\t", "     ", "\n\n", "\r\n", "\u00a0", "\u200b", "\u3000", "\u200d", "\u0301"):
        assert odd in text, repr(odd)


def test_instructor_edge_cases():
    pairs = calibration_pairs()
    as_pairs = [item for item in pairs if isinstance(item, list)]
    assert any(instruction == "" and text.strip() for instruction, text in as_pairs), "empty instruction"
    assert any(instruction == "x" and text.strip() for instruction, text in as_pairs), "one-character instruction"
    assert any(instruction.strip() and text == "" for instruction, text in as_pairs), "empty text"
    assert any(instruction.strip() and text and not text.strip() for instruction, text in as_pairs), "blank text"
    assert sum(isinstance(item, str) for item in pairs) >= 50, "bare strings"
    assert "" in pairs, "an empty bare string"
    longer = [p for p in as_pairs if p[1].strip() and len(p[0].split()) > 3 * len(p[1].split())]
    assert len(longer) >= 2, "instruction longer than its text"
    long_ones = [item for item in pairs if len((item if isinstance(item, str) else item[1]).split()) >= 700]
    assert len(long_ones) >= 3
    assert any(isinstance(item, str) for item in long_ones) and any(isinstance(item, list) for item in long_ones)


def test_tokenizer_takes_every_input(tiny_model):
    """With a T5 SentencePiece tokenizer: the 700-word texts pass 512 tokens, an instruction outweighs its text,
    and every row pools over at least one token (an empty pool would give NaN and spoil any parity check)."""
    tokenizer = PairTokenizer(load_tokenizer(tiny_model), max_length=512)
    pairs = calibration_pairs()
    tokenized = tokenizer(pairs)
    long_rows = [i for i, text in enumerate(_texts()) if len(text.split()) >= 700]
    assert len(long_rows) >= 3 and all(tokenized.truncated[i] for i in long_rows)
    assert all(start < len(ids) for start, ids in zip(tokenized.pool_start, tokenized.ids, strict=True))
    text_only = tokenizer([item[1] for item in pairs if isinstance(item, list)])
    starts = [s for s, item in zip(tokenized.pool_start, pairs, strict=True) if isinstance(item, list)]
    assert any(start > len(ids) - 1 for start, ids in zip(starts, text_only.ids, strict=True))


@pytest.mark.parametrize("data", ["empty", "shared"])
def test_same_set_whatever_the_data_folder(data, tmp_path):
    if data == "shared" and not (SHARED_DATA / "climate_fever_evidence.jsonl").is_file():
        pytest.skip(f"{SHARED_DATA} is absent: only the empty-folder half runs here")
    folder = tmp_path / "empty" if data == "empty" else SHARED_DATA
    folder.mkdir(exist_ok=True)
    seen = _dump(tmp_path, FASTINSTRUCTOR_DATA=str(folder))
    assert seen["file"] == str(REPO / "fastinstructor" / "__init__.py")
    assert seen["sha256"] == calibration_sha256()
    assert seen["pairs"] == calibration_pairs()


def test_wheel_ships_the_file(built_wheel):
    assert f"fastinstructor/{CALIBRATION_FILE}" in zipfile.ZipFile(built_wheel).namelist(), "not package data"


@pytest.mark.parametrize("where", ["installed", "zipped"])
def test_same_set_from_the_wheel(where, built_wheel, installed_wheel, tmp_path):
    """``pip install --target`` of the wheel, and the wheel itself as a zip on sys.path (importlib.resources)."""
    path = installed_wheel if where == "installed" else built_wheel
    seen = _dump(tmp_path, PYTHONPATH=str(path), FASTINSTRUCTOR_DATA=str(tmp_path))
    assert seen["file"] == str(path / "fastinstructor" / "__init__.py"), "imported the checkout, not the wheel"
    assert seen["sha256"] == calibration_sha256()
    assert seen["pairs"] == calibration_pairs()


@pytest.fixture
def fake_file(monkeypatch, tmp_path):
    """Point the loader at ``tmp_path/calibration.jsonl`` (write it or not), with the caches cleared around."""
    monkeypatch.setattr(calibration, "resources", SimpleNamespace(files=lambda package: tmp_path))
    calibration._raw.cache_clear()
    calibration._inputs.cache_clear()
    yield tmp_path / CALIBRATION_FILE
    monkeypatch.undo()
    calibration._raw.cache_clear()
    calibration._inputs.cache_clear()


@pytest.mark.parametrize(
    "content, problem",
    [
        (None, "cannot be read"),
        (b"", "is empty"),
        (b'"ok"\n{"instruction": "a", "text": \n', "line 2 is not JSON"),
        (b'"ok"\n\n"ok"\n', "line 2 is not JSON"),
        (b'{"text": "no instruction key"}\n', "line 1 is neither"),
        (b'{"instruction": "a", "text": 3}\n', "line 1 is neither"),
        (b'["a", "b"]\n', "line 1 is neither"),
        (b'"\\ud800"\n', "lone surrogate"),
        (b'"caf\xe9"\n', "is not UTF-8"),
    ],
)
def test_broken_file_is_a_clear_error(fake_file, content, problem):
    if content is not None:
        fake_file.write_bytes(content)
    with pytest.raises(CalibrationError, match=problem) as caught:
        calibration_pairs()
    assert f"fastinstructor/{CALIBRATION_FILE}" in str(caught.value) and "reinstall" in str(caught.value)


REPORT = (
    "import json, sys, fastinstructor; "
    "m = fastinstructor.load(sys.argv[1], backend='cpu', precision=sys.argv[2], parity_cache=False); "
    "r = m.backend_report; "
    "print(json.dumps({'file': fastinstructor.__file__, 'calibration': r['calibration_sha256'], "
    "'parity': {k: v for k, v in r['parity'].items() if k != 'cached'}}))"
)


def test_same_parity_report_with_or_without_the_shared_data_and_from_the_wheel(tiny_model, installed_wheel, tmp_path):
    """The dispatcher's judgement of one backend does not depend on where the package runs or what text is near."""
    precision = "int8"  # the cpu backend offers it on every CPU (backends/cpu.py)
    empty = tmp_path / "empty"
    empty.mkdir()
    places = {"checkout, no shared data": {"FASTINSTRUCTOR_DATA": str(empty)}}
    if (SHARED_DATA / "climate_fever_evidence.jsonl").is_file():
        places["checkout, shared data"] = {"FASTINSTRUCTOR_DATA": str(SHARED_DATA)}
    places["installed wheel"] = {"FASTINSTRUCTOR_DATA": str(empty), "PYTHONPATH": str(installed_wheel)}
    reports = {}
    for place, env in places.items():
        done = subprocess.run(
            [sys.executable, "-c", REPORT, str(tiny_model), precision],
            cwd=tmp_path,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        reports[place] = json.loads(done.stdout)
    assert reports["installed wheel"].pop("file").startswith(str(installed_wheel)), "imported the checkout"
    first, *others = [{k: v for k, v in r.items() if k != "file"} for r in reports.values()]
    assert first["calibration"] == calibration_sha256() and first["parity"]["rows"] == len(calibration_pairs())
    assert first["parity"]["calibration_sha256"] == calibration_sha256()
    assert all(other == first for other in others), reports
