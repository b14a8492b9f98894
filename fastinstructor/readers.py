"""Streaming corpus readers: JSON Lines, CSV/TSV, Parquet and plain text, from a file, several files or stdin.

A reader never loads the corpus whole: it yields one ``Row`` at a time and tracks its position (bytes for
text formats, rows for Parquet) for the progress bar. A row that cannot be used (bytes that are not UTF-8,
malformed JSON or CSV quoting, a missing or non-string field, a lone surrogate, an id that is not a string or
an integer) is yielded with ``error`` set, so the caller applies its ``--on-error`` policy with the file and
row number in hand; reading goes on with the next row.

An input is a file, a folder, a glob pattern, or several of these (``InputSpec.files``): a folder gives its files
whose suffix names the input format, in every subfolder, hidden ones (``.*``, ``_*``: ``_SUCCESS``, ``.crc``)
left out, sorted by their path in the folder; a pattern gives the files it matches (``**`` spans subfolders),
sorted; several paths are read in the order given, each expanded so. The files are read one after the other as
one stream, in one format, and numbered as their concatenation would be: a row's ``number`` (its line, or its row
in Parquet) continues from the previous file's last one, so default ids (the row number) are unique and equal
those of the concatenated file; ``CorpusReader.locate`` turns a number back into ``file:row`` for messages.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import sys
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .tokenization import lone_surrogate

__all__ = ["FORMATS", "InputSpec", "Row", "CorpusReader", "input_files"]

FORMATS = ("jsonl", "csv", "tsv", "parquet", "text")
_SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip", ".lz4")
_FORMAT_NAMES = {"jsonl": "JSON Lines", "csv": "CSV", "tsv": "TSV", "parquet": "Parquet", "text": "text"}


def _format_of(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValueError(
            f"cannot tell the format of {path} from its suffix {suffix!r}; pass --input-format ({', '.join(FORMATS)})"
        )
    return _SUFFIXES[suffix]


def _folder_files(folder: Path, format: str) -> list[str]:
    """The input files in ``folder`` and its subfolders (see the module docstring)."""
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if any(part.startswith((".", "_")) for part in relative.parts) or not path.is_file():
            continue
        kind = _SUFFIXES.get(path.suffix.lower())
        if kind is not None and format in ("auto", kind):
            found.append((relative.as_posix(), str(path)))
    if not found:
        suffixes = ", ".join(s for s, kind in _SUFFIXES.items() if format in ("auto", kind))
        raise FileNotFoundError(
            f"input folder {folder} holds no {_FORMAT_NAMES.get(format, 'JSON Lines, CSV, TSV, Parquet or text')} "
            f"file ({suffixes}, hidden ones "
            "left out); pass a glob pattern to read files of other names, e.g. 'folder/*.md' --input-format text"
        )
    return [path for _, path in sorted(found)]


def input_files(paths: str | Sequence[str], format: str = "auto") -> tuple[str, ...]:
    """The files that ``paths`` (a file, a folder, a glob pattern, or a sequence of these; ``-``: standard input)
    name, in reading order (see the module docstring). Raises for a path that names no file, a file named twice,
    or ``-`` beside other paths."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise ValueError("no input: pass a file, a folder or a glob pattern")
    if "-" in paths:
        if len(paths) > 1:
            raise ValueError("- (standard input) cannot be read together with other inputs")
        return ("-",)
    files: list[str] = []
    for path in paths:
        if Path(path).suffix.lower() in _COMPRESSED:
            raise ValueError(
                f"input {path} is compressed; decompress it, or pipe it in: zcat {path} | fastinstructor embed "
                "--input - --input-format jsonl (or csv, tsv, text) ..."
            )
        if Path(path).is_file():
            files.append(path)
        elif Path(path).is_dir():
            files += _folder_files(Path(path), format)
        elif Path(path).exists():
            raise ValueError(
                f"input {path} is not a regular file (a pipe or a device): pass it on standard input instead, "
                "--input - --input-format F (a job from standard input cannot be resumed)"
            )
        elif glob.has_magic(path):
            matched = sorted(m for m in glob.glob(path, recursive=True) if Path(m).is_file())
            if not matched:
                raise FileNotFoundError(f"input pattern {path} matches no file")
            files += matched
        else:
            raise FileNotFoundError(f"input file {path} does not exist (nor is it a folder or a glob pattern)")
    seen: dict[str, str] = {}
    for file in files:
        key = os.path.realpath(file)
        if key in seen:
            raise ValueError(f"input file {file} is named twice ({seen[key]} and {file}); name each file once")
        seen[key] = file
    return tuple(files)


@dataclass(frozen=True)
class InputSpec:
    """Where the corpus is and which fields to read."""

    path: str | tuple[str, ...]  # a file, a folder, a glob pattern, several of these, or "-" for standard input
    format: str = "auto"  # auto (from the files' suffix) or one of FORMATS
    text_field: str = "text"
    id_field: str | None = None  # None: the "id" field where a row has one, else the row number
    instruction_field: str | None = None  # per-row instructions instead of one for all
    files: tuple[str, ...] = field(init=False, repr=False)  # what path names (input_files), in reading order

    def __post_init__(self) -> None:
        if self.format not in ("auto", *FORMATS):
            raise ValueError(f"input format {self.format!r} is not one of auto, {', '.join(FORMATS)}")
        if isinstance(self.path, os.PathLike):
            object.__setattr__(self, "path", os.fspath(self.path))
        elif not isinstance(self.path, str):  # a sequence of paths (one of them: that path)
            paths = tuple(os.fspath(p) for p in self.path)
            object.__setattr__(self, "path", paths[0] if len(paths) == 1 else paths)
        if self.path == "-" and self.format in ("auto", "parquet"):
            raise ValueError(
                "reading standard input needs --input-format jsonl, csv, tsv or text (Parquet needs a seekable file)"
            )
        object.__setattr__(self, "files", input_files(self.path, self.format))
        _ = self.resolved_format  # one format for every file, or an error now

    @property
    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        formats = {file: _format_of(file) for file in self.files}
        if len(set(formats.values())) > 1:
            first = {}
            for file, kind in formats.items():
                first.setdefault(kind, file)
            mixed = ", ".join(f"{kind} ({file})" for kind, file in first.items())
            raise ValueError(
                f"the input files mix formats: {mixed}; read one format per job (a glob pattern such as "
                "'folder/*.jsonl' selects one), or pass --input-format"
            )
        return formats[self.files[0]]

    @property
    def name(self) -> str:
        if self.path == "-":
            return "<stdin>"
        return self.path if isinstance(self.path, str) else " ".join(self.path)


@dataclass(frozen=True)
class Row:
    number: int  # 1-based line number (text formats) or row number (Parquet), for error messages
    id: str | None = None
    instruction: str | None = None
    text: str | None = None
    error: str | None = None  # why the row cannot be used; None for a good row


class CorpusReader:
    """Iterate ``Row``s of one input (its files one after the other); ``position``/``total`` (in ``unit``) drive
    the progress bar."""

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec
        self.format = spec.resolved_format
        self.position = 0
        self.count = 0  # the last row number given out (lines of a text format, rows of Parquet)
        self.offset = 0  # added to a row's number where it is the row's id: the rows of the files before this one
        self._undecodable: dict[int, str] = {}  # line number -> why it is not UTF-8
        self.unit = "rows" if self.format == "parquet" else "B"
        self.total: int | None = None
        self._files: list[CorpusReader] | None = None  # several files: a reader each, read in turn
        self._offsets: list[int] = []  # the row number before each file's first, for those opened so far
        if len(spec.files) > 1:
            self._files = [CorpusReader(replace(spec, path=file, format=self.format)) for file in spec.files]
            self.total = sum(reader.total for reader in self._files)
            return
        if spec.path != spec.files[0]:  # a folder or a pattern that names one file
            self.spec = spec = replace(spec, path=spec.files[0])
        if self.format == "parquet":
            import pyarrow.parquet as pq

            self.total = pq.ParquetFile(spec.path).metadata.num_rows
        elif spec.path != "-":
            self.total = Path(spec.path).stat().st_size

    def locate(self, number: int) -> str:
        """``file:row`` of the row numbered ``number`` (the row's number in its own file), for messages."""
        if self._files is None:
            return f"{self.spec.name}:{number}"
        index = bisect_left(self._offsets, number) - 1  # the last file opened before that row
        if index < 0:
            return f"{self.spec.name}:{number}"
        return f"{self._files[index].spec.name}:{number - self._offsets[index]}"

    def _chained(self) -> Iterator[Row]:
        done = self.position = self.count = 0  # done: the position of the files read before this one
        self._offsets = []
        for reader in self._files:
            reader.offset = offset = self.count
            self._offsets.append(offset)
            for row in reader:
                self.position = done + reader.position
                self.count = offset + row.number
                yield Row(self.count, row.id, row.instruction, row.text, row.error) if offset else row
            done += reader.position
            self.count = offset + reader.count  # trailing lines that gave no row count too

    def __iter__(self) -> Iterator[Row]:
        if self._files is not None:
            yield from self._chained()
            return
        if self.format == "parquet":
            yield from self._parquet()
            return
        lines = self._lines()
        if self.format == "jsonl":
            yield from self._jsonl(lines)
        elif self.format == "text":
            for number, line in lines:
                error = self._undecodable.pop(number, None)
                yield (
                    Row(number, error=error)
                    if error
                    else Row(number, str(self.offset + number), text=line.rstrip("\r\n"))
                )
        else:
            yield from self._csv(lines)

    def _lines(self) -> Iterator[tuple[int, str]]:
        """Decoded lines with their numbers, counting bytes read (text iteration has no usable tell()).

        A line that is not UTF-8 is decoded with its bad bytes escaped (``surrogateescape``) and its reason kept
        in ``self._undecodable``, so that the row it belongs to becomes a bad row and reading goes on.
        """
        stream = sys.stdin.buffer if self.spec.path == "-" else open(self.spec.path, "rb")
        try:
            for number, raw in enumerate(stream, start=1):
                self.position += len(raw)
                self.count = number
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark (Excel, Notepad)
                    raw = raw[3:]
                try:
                    yield number, raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    self._undecodable[number] = f"not UTF-8 text ({err.reason}: byte {err.start + 1} of the line)"
                    yield number, raw.decode("utf-8", "surrogateescape")
        finally:
            if stream is not sys.stdin.buffer:
                stream.close()

    def _pop_undecodable(self, first: int, last: int) -> list[str]:
        return [self._undecodable.pop(n) for n in range(first, last + 1) if n in self._undecodable]

    def _record(self, number: int, record: object) -> Row:
        """A row from a mapping of fields, checking the ones we need."""
        if not isinstance(record, dict):
            return Row(number, error=f"expected a JSON object, got {type(record).__name__}")
        text = record.get(self.spec.text_field)
        if self.spec.text_field not in record:
            return Row(number, error=f"no field {self.spec.text_field!r} (set --text-field)")
        if not isinstance(text, str):
            return Row(number, error=f"field {self.spec.text_field!r} is {type(text).__name__}, not a string")
        instruction = None
        if self.spec.instruction_field is not None:
            instruction = record.get(self.spec.instruction_field)
            if not isinstance(instruction, str):
                what = "missing" if instruction is None else f"{type(instruction).__name__}, not a string"
                return Row(number, error=f"instruction field {self.spec.instruction_field!r} is {what}")
        for name, value in ((self.spec.text_field, text), (self.spec.instruction_field, instruction)):
            if value is not None and lone_surrogate(value) is not None:
                return Row(number, error=f"field {name!r} holds a lone surrogate, which is not Unicode text")
        id_field = self.spec.id_field or "id"
        if id_field in record:
            row_id = record[id_field]
            # 1 and "1" both become "1" (and are then counted as duplicates); anything else has no faithful
            # string form: 1.0, true, null, objects.
            if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
                what = "null" if row_id is None else type(row_id).__name__
                return Row(number, error=f"id field {id_field!r} is {what}; ids must be strings or integers")
            row_id = str(row_id)
            if lone_surrogate(row_id) is not None:
                return Row(number, error=f"id field {id_field!r} holds a lone surrogate, which is not Unicode text")
        elif self.spec.id_field is not None:
            return Row(number, error=f"no id field {self.spec.id_field!r}")
        else:
            row_id = str(self.offset + number)
        return Row(number, id=row_id, instruction=instruction, text=text)

    def _jsonl(self, lines: Iterator[tuple[int, str]]) -> Iterator[Row]:
        for number, line in lines:
            if number in self._undecodable:
                yield Row(number, error=self._undecodable.pop(number))
                continue
            if not line.strip():
                continue  # blank lines separate nothing in JSON Lines
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield Row(number, error=f"malformed JSON ({err.msg} at column {err.colno})")
                continue
            except (ValueError, RecursionError) as err:  # an integer of over 4,300 digits; nesting too deep
                yield Row(number, error=f"unreadable JSON ({type(err).__name__}: {str(err)[:200]})")
                continue
            yield self._record(number, record)

    def _csv(self, lines: Iterator[tuple[int, str]]) -> Iterator[Row]:
        tsv = self.format == "tsv"
        # csv wants an iterable of strings; remember each physical line number for messages.
        current = [0]

        def text_lines() -> Iterator[str]:
            for number, line in lines:
                current[0] = number
                yield line

        # strict: a quote that is never closed, or text after a closing quote, is an error instead of rows
        # silently merged into one field up to the next quote (or the end of the file). TSV has no quoting (IANA's
        # text/tab-separated-values, as MS MARCO, BEIR and STS-B write it): a line is a row, a quote is a character.
        csv.field_size_limit(sys.maxsize)  # a long text is truncated by the tokenizer, never refused here
        quoting = csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL
        reader = csv.reader(text_lines(), delimiter="\t" if tsv else ",", strict=True, quoting=quoting)
        try:
            header = next(reader, None)
        except csv.Error as err:
            raise ValueError(f"{self.spec.name}: the header line is not valid CSV ({err})") from None
        if header is None:
            return
        while True:
            first = current[0] + 1  # a record may span several lines (quoted newlines)
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                self._pop_undecodable(first, current[0])
                hint = "" if tsv else "; check its quotes"
                yield Row(
                    first, error=f"malformed {_FORMAT_NAMES[self.format]} in lines {first}-{current[0]} ({err}){hint}"
                )
                continue
            number = current[0]
            undecodable = self._pop_undecodable(first, number)
            if undecodable:
                yield Row(number, error=undecodable[0])
            elif not values:
                continue
            elif len(values) != len(header):
                hint = " (TSV has no quoting: a tab in a text splits it; write such a file as CSV)" if tsv else ""
                yield Row(number, error=f"{len(values)} fields, the header has {len(header)}{hint}")
            else:
                yield self._record(number, dict(zip(header, values, strict=True)))

    def _parquet(self) -> Iterator[Row]:
        import pyarrow.parquet as pq

        file = pq.ParquetFile(self.spec.path)
        columns = [self.spec.text_field, self.spec.id_field or "id", self.spec.instruction_field]
        present = [c for c in dict.fromkeys(columns) if c is not None and c in file.schema_arrow.names]
        if self.spec.text_field not in present:
            raise ValueError(
                f"{self.spec.path}: no column {self.spec.text_field!r} (columns: {file.schema_arrow.names}); "
                "set --text-field"
            )
        for batch in file.iter_batches(batch_size=4096, columns=present):
            for record in batch.to_pylist():
                self.position = self.count = self.position + 1
                yield self._record(self.position, record)
