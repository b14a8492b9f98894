"""Tokenizing (instruction, text) pairs exactly as the authors' InstructorEmbedding 1.0.1 does.

For a pair the model reads ``(instruction + text.strip()).strip()`` (no separator: the instruction's own
trailing space or colon is the boundary), truncated to ``max_seq_length`` with ``</s>`` kept last. Pooling
skips the first ``n`` positions, where ``n`` is the token count of ``instruction.strip()`` without its
``</s>``; with the authors' rule an instruction of 0 or 1 tokens gives ``n = 0`` (pool everything). The
sentence-transformers rule (``prompt=`` with ``include_prompt=False``) is the same without that exception.
A plain string pools over all its tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

__all__ = ["POOLING_RULES", "PairTokenizer", "Tokenized", "check_sentences", "load_tokenizer", "lone_surrogate"]

POOLING_RULES = ("instructor", "sentence-transformers")


def load_tokenizer(folder: Path):
    """The checkpoint's fast tokenizer, from the folder (never from a bare vocab file; see the README)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"cannot load the tokenizer in {folder}: {err}") from None


def lone_surrogate(text: str) -> int | None:
    """Where ``text`` holds a lone surrogate (JSON's ``"\\ud800"``, or bytes that were not UTF-8 read with
    ``surrogateescape``), or None. Such a string is no Unicode text: the tokenizer cannot take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


def check_sentences(sentences: Sequence) -> None:
    """A TypeError or ValueError naming the first item that is neither a string nor an [instruction, text] pair."""
    if isinstance(sentences, (str, bytes)) or not isinstance(sentences, Sequence):
        raise TypeError(
            f"sentences must be a list of [instruction, text] pairs or of strings, got {type(sentences).__name__}"
        )
    for i, item in enumerate(sentences):
        if isinstance(item, str):
            continue
        if not isinstance(item, (list, tuple)):
            raise TypeError(
                f"sentences[{i}] is {type(item).__name__}; expected a string or an [instruction, text] pair"
            )
        if len(item) != 2:
            raise ValueError(f"sentences[{i}] has {len(item)} items; expected exactly 2: [instruction, text]")
        for j, part in enumerate(item):
            if not isinstance(part, str):
                what = "instruction" if j == 0 else "text"
                raise TypeError(f"sentences[{i}][{j}] ({what}) is {type(part).__name__}; expected str")


class Tokenized(NamedTuple):
    ids: list[list[int]]  # per sentence, ending in </s>
    pool_start: list[int]  # first pooled position (0 for plain strings)
    truncated: list[bool]  # whether the sentence was cut to max_length


@dataclass
class PairTokenizer:
    """Turns sentences into token ids and pooling start positions; instruction lengths are cached."""

    tokenizer: object
    max_length: int
    pooling_rule: str = "instructor"

    def __post_init__(self) -> None:
        if self.pooling_rule not in POOLING_RULES:
            raise ValueError(f"pooling_rule {self.pooling_rule!r} is not one of {POOLING_RULES}")
        if self.max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {self.max_length}")
        # Instructions repeat across millions of texts: count each one once.
        self.instruction_length = lru_cache(maxsize=4096)(self._instruction_length)

    def _prefix(self, text: str) -> str:
        """The part of ``text`` that decides its truncated ids: the shortest prefix of ``8 * max_length * 2**i``
        characters whose words, all but the last, give at least ``max_length`` tokens; else the whole text.

        Why its truncated ids and ``truncated`` flag are exactly those of the whole text, with the T5 tokenizer:
        it splits special tokens (none holds whitespace) out of the text, normalizes the rest grapheme by
        grapheme (SentencePiece's character map: NFKC, whitespace to spaces; older tokenizer.json files then
        collapse space runs), splits it into words at whitespace (WhitespaceSplit / Metaspace) and encodes each
        word on its own (Unigram). Up to the word the cut falls in, the prefix and the whole text hold the same
        graphemes, so they are normalized, split and encoded the same; only that last word may differ (cut in
        two, or joined to what follows). So the tokens before it are the first tokens of the whole text too, and
        with ``max_length`` of them both are truncated to the same ``max_length - 1`` tokens and ``</s>``.
        Characters per token have no bound (a whitespace run gives no token, a word cannot be cut), hence the
        doubling; the first bound, 8 characters per token, is twice what English takes.
        """
        bound = 8 * self.max_length
        while bound < len(text):
            words = self.tokenizer(text[:bound], add_special_tokens=False, verbose=False).word_ids()
            if words and words.index(words[-1]) >= self.max_length:  # tokens before the last word (ids ascend)
                return text[:bound]
            bound *= 2
        return text

    def _ids(self, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Ids truncated to ``max_length`` with ``</s>`` kept last, as transformers' truncation does, and
        whether each text was cut: tokenizing one token further tells that exactly. A long text is tokenized
        only as far as its truncated ids depend on it (``_prefix``): a whole 4 MiB text would take seconds."""
        texts = [self._prefix(text) for text in texts]
        rows = self.tokenizer(texts, truncation=True, max_length=self.max_length + 1)["input_ids"]
        cut = [len(row) > self.max_length for row in rows]
        return [row[: self.max_length - 1] + row[-1:] if c else row for row, c in zip(rows, cut, strict=True)], cut

    def _instruction_length(self, instruction: str) -> int:
        n = len(self._ids([instruction.strip()])[0][0]) - 1  # without </s>
        if self.pooling_rule == "instructor" and n <= 1:
            return 0
        return n

    def __call__(self, sentences: Sequence) -> Tokenized:
        """Token ids per sentence, the position where pooling starts, and which were truncated; input order."""
        check_sentences(sentences)
        joined = [s.strip() if isinstance(s, str) else (s[0] + s[1].strip()).strip() for s in sentences]
        ids, truncated = self._ids(joined) if joined else ([], [])
        starts = [0 if isinstance(s, str) else self.instruction_length(s[0]) for s in sentences]
        return Tokenized(ids, starts, truncated)
