"""Streaming corpus readers: JSON Lines, CSV/TSV, Parquet and plain text, from a file or stdin.

A reader never loads the corpus whole: it yields one ``Row`` at a time and tracks its position (bytes for
text formats, rows for Parquet) for the progress bar. A row that cannot be used (malformed JSON, a missing
or non-string field) is yielded with ``error`` set, so the caller applies its ``--on-error`` policy with
the file and row number in hand.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
                yield Row(number, id=str(number), text=line.rstrip("\r\n"))
        else:
            yield from self._csv(lines)

    def _lines(self) -> Iterator[tuple[int, str]]:
        """Decoded lines with their numbers, counting bytes read (text iteration has no usable tell())."""
        stream = sys.stdin.buffer if self.spec.path == "-" else open(self.spec.path, "rb")
        try:
            for number, raw in enumerate(stream, start=1):
                self.position += len(raw)
                try:
                    yield number, raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(f"{self.spec.name}:{number}: not UTF-8 text ({err.reason})") from None
        finally:
            if stream is not sys.stdin.buffer:
                stream.close()

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
        id_field = self.spec.id_field or "id"
        if id_field in record and record[id_field] is not None:
            row_id = str(record[id_field])
        elif self.spec.id_field is not None:
            return Row(number, error=f"no id field {self.spec.id_field!r}")
        else:
            row_id = str(number)
        return Row(number, id=row_id, instruction=instruction, text=text)

    def _jsonl(self, lines: Iterator[tuple[int, str]]) -> Iterator[Row]:
        for number, line in lines:
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

        reader = csv.reader(text_lines(), delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return
        for values in reader:
            number = current[0]
            if not values:
                continue
            if len(values) != len(header):
                yield Row(number, error=f"{len(values)} fields, the header has {len(header)}")
                continue
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
