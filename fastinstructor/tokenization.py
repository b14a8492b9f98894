"""Tokenizing (instruction, text) pairs exactly as the authors' InstructorEmbedding 1.0.1 does.

For a pair the model reads ``(instruction + text.strip()).strip()`` (no separator: the instruction's own
trailing space or colon is the boundary), truncated to ``max_seq_length`` with ``</s>`` kept last. Pooling
skips the first ``n`` positions, where ``n`` is the token count of ``instruction.strip()`` without its
``</s>``; with the authors' rule an instruction of 0 or 1 tokens gives ``n = 0`` (pool everything). The
sentence-transformers rule (``prompt=`` with ``include_prompt=False``) is the same without that exception.
A plain string pools over all its tokens.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "POOLING_RULES",
    "PairTokenizer",
    "Tokenized",
    "Window",
    "check_sentences",
    "load_tokenizer",
    "lone_surrogate",
]

POOLING_RULES = ("instructor", "sentence-transformers")
_FIRST_WINDOW = 8  # characters per token in PairTokenizer.window's first bound: twice what English takes
# A transformers fast tokenizer sets its truncation on the shared Rust tokenizer before each call (truncation=True
# in _ids, none in window), so two threads calling one tokenizer at once can tokenize with the other's setting:
# window's encoding then comes back cut to max_length + 1 tokens. The server tokenizes on two threads.
_HF_CALL = threading.Lock()


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
            _check_text(item, f"sentences[{i}]")
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
            _check_text(part, f"sentences[{i}][{j}]")


def _check_text(text: str, where: str) -> None:
    """A ValueError for a string that is not Unicode text (a lone surrogate): the tokenizer cannot take it."""
    at = lone_surrogate(text)
    if at is not None:
        raise ValueError(
            f"{where} holds a lone surrogate {text[at]!r} at character {at}: not Unicode text (bytes that were not "
            "UTF-8, decoded with surrogateescape, or JSON's \\udXXX escapes); decode or clean it first"
        )


class Window(NamedTuple):
    """``PairTokenizer.window``'s part of a text: where it starts in the text, the part, its encoding with offsets,
    and the index of its first whole-word token and one past its last."""

    offset: int
    text: str
    encoding: object
    first: int
    last: int


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

    def window(self, text: str, need: int, from_end: bool = False) -> Window:
        """The start (or end, ``from_end``) of ``text`` that holds at least ``need`` tokens in whole words, or all
        of it: the shortest window of ``8 * max_length * 2**i`` characters that does, tokenized with offsets. Only
        that much of a long text is tokenized (a whole 4 MiB text would take seconds). A word cut by the window's
        edge is left out of ``first:last``, since it may tokenize differently from the whole word.

        Why the window's tokens before its cut word are exactly the whole text's first tokens, with the T5
        tokenizer: it splits special tokens (none holds whitespace) out of the text, normalizes the rest grapheme by
        grapheme (SentencePiece's character map: NFKC, whitespace to spaces; older tokenizer.json files then
        collapse space runs), splits it into words at whitespace (WhitespaceSplit / Metaspace) and encodes each
        word on its own (Unigram). Up to the word the cut falls in, the window and the whole text hold the same
        graphemes, so they are normalized, split and encoded the same; only that last word may differ (cut in
        two, or joined to what follows); the same holds mirrored from the end. Characters per token have no bound
        (a whitespace run gives no token, a word cannot be cut), hence the doubling; the first bound, 8 characters
        per token, is twice what English takes.
        """
        bound = _FIRST_WINDOW * self.max_length
        while True:
            whole = bound >= len(text)
            window = text if whole else (text[-bound:] if from_end else text[:bound])
            with _HF_CALL:
                encoding = self.tokenizer(window, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            words = encoding.word_ids()
            first, last = 0, len(words)
            if not whole and words:
                if from_end:
                    first = words.count(words[0])
                else:
                    last -= words.count(words[-1])
            if whole or last - first >= need:
                return Window(len(text) - len(window) if from_end else 0, window, encoding, first, last)
            bound *= 2

    def _ids(self, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Ids truncated to ``max_length`` with ``</s>`` kept last, as transformers' truncation does, and
        whether each text was cut: tokenizing one token further tells that exactly. A long text is tokenized
        only as far as its truncated ids depend on it: the ``window`` of ``max_length`` whole-word tokens, with which
        both are truncated to the same ``max_length - 1`` tokens and ``</s>`` (a text within the window's first bound
        is tokenized once, whole)."""
        short = _FIRST_WINDOW * self.max_length
        texts = [text if len(text) <= short else self.window(text, self.max_length).text for text in texts]
        with _HF_CALL:
            rows = self.tokenizer(texts, truncation=True, max_length=self.max_length + 1)["input_ids"]
        cut = [len(row) > self.max_length for row in rows]
        return [row[: self.max_length - 1] + row[-1:] if c else row for row, c in zip(rows, cut, strict=True)], cut

    def _instruction_length(self, instruction: str) -> int:
        n = len(self._ids([instruction.strip()])[0][0]) - 1  # without </s>
        if self.pooling_rule == "instructor" and n <= 1:
            return 0
        return n

    def fills_length(self, instruction: str) -> bool:
        """Whether ``instruction`` takes every token of ``max_length`` but ``</s>``: no token of a text after it is
        kept, only ``</s>`` is pooled, and every text gets the same embedding (the authors' package too, silently)."""
        return 0 < self.instruction_length(instruction) >= self.max_length - 1

    def warn_if_full(self, sentences: Sequence) -> None:
        """A warning when an instruction of ``sentences`` ``fills_length``: ``encode`` keeps the authors' semantics,
        and the server and the embed job refuse such inputs."""
        full = sorted(i for i in {s[0] for s in sentences if not isinstance(s, str)} if self.fills_length(i))
        if full:
            warnings.warn(
                f"the instruction {full[0][:80]!r} takes all {self.max_length - 1} tokens of max_seq_length before "
                "</s>: no token of a text after it is embedded, so all those texts get the same embedding; shorten it",
                stacklevel=3,
            )

    def __call__(self, sentences: Sequence) -> Tokenized:
        """Token ids per sentence, the position where pooling starts, and which were truncated; input order."""
        check_sentences(sentences)
        joined = [s.strip() if isinstance(s, str) else (s[0] + s[1].strip()).strip() for s in sentences]
        ids, truncated = self._ids(joined) if joined else ([], [])
        starts = [0 if isinstance(s, str) else self.instruction_length(s[0]) for s in sentences]
        return Tokenized(ids, starts, truncated)
