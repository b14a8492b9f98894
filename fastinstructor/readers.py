"""Streaming corpus readers: JSON Lines, CSV/TSV, Parquet and plain text, from a file or stdin.

A reader never loads the corpus whole: it yields one ``Row`` at a time and tracks its position (bytes for
text formats, rows for Parquet) for the progress bar. A row that cannot be used (bytes that are not UTF-8,
malformed JSON or CSV quoting, a missing or non-string field, a lone surrogate, an id that is not a string or
an integer) is yielded with ``error`` set, so the caller applies its ``--on-error`` policy with the file and
row number in hand; reading goes on with the next row.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .tokenization import lone_surrogate

__all__ = ["FORMATS", "InputSpec", "Row", "CorpusReader"]

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


@dataclass(frozen=True)
class InputSpec:
    """Where the corpus is and which fields to read."""

    path: str  # a file, or "-" for standard input
    format: str = "auto"  # auto (from the file suffix) or one of FORMATS
    text_field: str = "text"
    id_field: str | None = None  # None: the "id" field where a row has one, else the row number
    instruction_field: str | None = None  # per-row instructions instead of one for all

    def __post_init__(self) -> None:
        if self.format not in ("auto", *FORMATS):
            raise ValueError(f"input format {self.format!r} is not one of auto, {', '.join(FORMATS)}")
        if self.path == "-" and self.format in ("auto", "parquet"):
            raise ValueError(
                "reading standard input needs --input-format jsonl, csv, tsv or text (Parquet needs a seekable file)"
            )
        if self.path != "-" and not Path(self.path).is_file():
            raise FileNotFoundError(f"input file {self.path} does not exist (or is not a file)")

    @property
    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        suffix = Path(self.path).suffix.lower()
        if suffix not in _SUFFIXES:
            raise ValueError(
                f"cannot tell the format of {self.path} from its suffix {suffix!r}; "
                f"pass --input-format ({', '.join(FORMATS)})"
            )
        return _SUFFIXES[suffix]

    @property
    def name(self) -> str:
        return "<stdin>" if self.path == "-" else self.path


@dataclass(frozen=True)
class Row:
    number: int  # 1-based line number (text formats) or row number (Parquet), for error messages
    id: str | None = None
    instruction: str | None = None
    text: str | None = None
    error: str | None = None  # why the row cannot be used; None for a good row


class CorpusReader:
    """Iterate ``Row``s of one input; ``position``/``total`` (in ``unit``) drive the progress bar."""

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec
        self.format = spec.resolved_format
        self.position = 0
        self._undecodable: dict[int, str] = {}  # line number -> why it is not UTF-8
        self.unit = "rows" if self.format == "parquet" else "B"
        self.total: int | None = None
        if self.format == "parquet":
            import pyarrow.parquet as pq

            self.total = pq.ParquetFile(spec.path).metadata.num_rows
        elif spec.path != "-":
            self.total = Path(spec.path).stat().st_size

    def __iter__(self) -> Iterator[Row]:
        if self.format == "parquet":
            yield from self._parquet()
            return
        lines = self._lines()
        if self.format == "jsonl":
            yield from self._jsonl(lines)
        elif self.format == "text":
            for number, line in lines:
                error = self._undecodable.pop(number, None)
                yield Row(number, error=error) if error else Row(number, id=str(number), text=line.rstrip("\r\n"))
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
            row_id = str(number)
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
            yield self._record(number, record)

    def _csv(self, lines: Iterator[tuple[int, str]]) -> Iterator[Row]:
        delimiter = "\t" if self.format == "tsv" else ","
        # csv wants an iterable of strings; remember each physical line number for messages.
        current = [0]

        def text_lines() -> Iterator[str]:
            for number, line in lines:
                current[0] = number
                yield line

        # strict: a quote that is never closed, or text after a closing quote, is an error instead of rows
        # silently merged into one field up to the next quote (or the end of the file).
        reader = csv.reader(text_lines(), delimiter=delimiter, strict=True)
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
                yield Row(first, error=f"malformed CSV in lines {first}-{current[0]} ({err}); check its quotes")
                continue
            number = current[0]
            undecodable = self._pop_undecodable(first, number)
            if undecodable:
                yield Row(number, error=undecodable[0])
            elif not values:
                continue
            elif len(values) != len(header):
                yield Row(number, error=f"{len(values)} fields, the header has {len(header)}")
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
                self.position += 1
                yield self._record(self.position, record)
