"""The workloads ``fastinstructor bench`` times: the shared climate-fever files, a mix of them, texts of an exact
token length, or a file of the user's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data import read_jsonl_texts, sample_passages, shared_data_dir

__all__ = ["WORKLOADS", "Workload", "load_workload"]

CLAIM_INSTRUCTION = "Represent the climate claim for retrieving supporting documents:"
EVIDENCE_INSTRUCTION = "Represent the Wikipedia document for retrieval:"
ARTICLE_INSTRUCTION = "Represent the Wikipedia article for retrieval:"
# name -> (file in the shared data folder, its instruction)
WORKLOADS = {
    "claims": ("climate_fever_claims.jsonl", CLAIM_INSTRUCTION),
    "evidence": ("climate_fever_evidence.jsonl", EVIDENCE_INSTRUCTION),
    "articles": ("climate_fever_articles.jsonl", ARTICLE_INSTRUCTION),
}


@dataclass(frozen=True)
class Workload:
    name: str
    pairs: list[list[str]]  # [instruction, text], in order
    source: str


def load_workload(spec: str, texts: int, tokenizer, instruction: str | None = None) -> Workload:
    """``claims``, ``evidence``, ``articles``, ``mixed`` (the three interleaved), ``synthetic:L`` (every input
    exactly L tokens) or the path of a file (JSON Lines, CSV, TSV, Parquet or text; ``instruction`` for all rows).
    """
    if texts < 1:
        raise ValueError(f"--texts must be at least 1, got {texts}")
    if spec.startswith("synthetic:"):
        return _synthetic(spec, texts, tokenizer, instruction or EVIDENCE_INSTRUCTION)
    if spec in WORKLOADS or spec == "mixed":
        data = shared_data_dir()
        if data is None:
            raise FileNotFoundError(
                f"workload {spec!r} reads the shared climate-fever data, which was not found; set "
                "FASTINSTRUCTOR_DATA to its folder, or use --workload synthetic:L or --workload <your file>"
            )
        names = list(WORKLOADS) if spec == "mixed" else [spec]
        groups = []
        for name in names:
            file, default_instruction = WORKLOADS[name]
            rows = read_jsonl_texts(data / file, texts)
            groups.append([[instruction or default_instruction, text] for _, text in rows])
        pairs = [row for rows in _round_robin(groups) for row in rows][:texts]
        return Workload(spec, pairs, ", ".join(str(data / WORKLOADS[n][0]) for n in names))
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"workload {spec!r} is neither one of {', '.join([*WORKLOADS, 'mixed', 'synthetic:L'])} nor a file"
        )
    from ..readers import CorpusReader, InputSpec

    pairs = []
    for row in CorpusReader(InputSpec(str(path))):
        if len(pairs) >= texts:
            break
        if row.error is None:
            pairs.append([row.instruction or instruction or EVIDENCE_INSTRUCTION, row.text])
    if not pairs:
        raise ValueError(f"workload file {path} has no usable rows")
    return Workload(path.stem, pairs, str(path))


def _round_robin(groups: list[list[list[str]]]):
    for i in range(max(len(g) for g in groups)):
        yield [g[i] for g in groups if i < len(g)]


def _synthetic(spec: str, texts: int, tokenizer, instruction: str) -> Workload:
    """Texts of real words whose pairs tokenize to exactly L tokens (each found by bisection on word count)."""
    try:
        length = int(spec.split(":", 1)[1])
    except ValueError:
        raise ValueError(
            f"workload {spec!r}: expected synthetic:L with L a number of tokens, e.g. synthetic:128"
        ) from None
    floor = len(tokenizer([[instruction, ""]]).ids[0])
    if not floor < length <= tokenizer.max_length:
        raise ValueError(
            f"workload {spec!r}: L must be between {floor + 1} (the instruction and </s>) and the model's "
            f"max_seq_length {tokenizer.max_length}"
        )
    passages, source = sample_passages(200)
    words = " ".join(text for _, text in passages).split()
    words *= 1 + 16 * length // len(words)  # enough for every start offset below, even from a short source

    def count(text: str) -> int:
        return len(tokenizer([[instruction, text]]).ids[0])

    def fit(start: int) -> str:
        lo, hi = 0, 4 * length  # words; each word is at least one token
        while lo < hi:  # the most words from ``start`` staying within L tokens
            mid = (lo + hi + 1) // 2
            if count(" ".join(words[start : start + mid])) <= length:
                lo = mid
            else:
                hi = mid - 1
        return " ".join(words[start : start + lo])

    pairs = []
    for i in range(texts):
        start = (i * 37) % max(1, len(words) - 8 * length)
        for shift in range(64):  # a multi-token last word can leave a gap: start one word later
            text = fit(start + shift)
            if count(text) == length:
                break
        pairs.append([instruction, text])
    return Workload(spec.replace(":", "-"), pairs, "synthetic: words of " + source)
