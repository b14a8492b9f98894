"""Issue 13, defect 9: a long text is cut before it is tokenized, with exactly the result of the whole text.

The reference below tokenizes the whole joined string as docs/design.md section 4 says, with the tokenizer itself;
``PairTokenizer`` must give the same ids, pooling start and ``truncated`` flag without ever handing the
tokenizer the whole of a long text.
"""

from __future__ import annotations

import random
import time

import pytest
from conftest import INSTRUCTIONS

from fastinstructor.data import read_jsonl_texts, shared_data_dir
from fastinstructor.tokenization import POOLING_RULES, PairTokenizer, load_tokenizer

MiB = 2**20


@pytest.fixture(scope="module", params=["as-loaded", "legacy"])
def tokenizer(tiny_model, request):
    """The tokenizer as transformers builds it here (WhitespaceSplit + Metaspace), and as the hub's INSTRUCTOR
    tokenizer.json files of 2022 describe it (spaces collapsed by the normalizer, Metaspace alone)."""
    loaded = load_tokenizer(tiny_model)
    if request.param == "legacy":
        from tokenizers import Regex, normalizers, pre_tokenizers

        backend = loaded.backend_tokenizer
        backend.normalizer = normalizers.Sequence([backend.normalizer, normalizers.Replace(Regex(" {2,}"), " ")])
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    return loaded


def whole_text(tokenizer, max_length: int, sentences: list) -> tuple[list, list, list]:
    """docs/design.md section 4 on the whole text: tokenize everything, keep ``max_length - 1`` tokens and ``</s>``.
    The pooling start is the instruction's token count (``PairTokenizer`` applies its rule to it)."""

    def ids(text: str) -> tuple[list[int], bool]:
        row = tokenizer(text, verbose=False)["input_ids"]
        return (row[: max_length - 1] + row[-1:], True) if len(row) > max_length else (row, False)

    rows, counts, truncated = [], [], []
    for s in sentences:
        joined = s.strip() if isinstance(s, str) else (s[0] + s[1].strip()).strip()
        row, cut = ids(joined)
        rows.append(row)
        truncated.append(cut)
        counts.append(None if isinstance(s, str) else len(ids(s[0].strip())[0]) - 1)
    return rows, counts, truncated


def assert_same_as_whole_text(tokenizer, max_length: int, sentences: list) -> int:
    """Both pooling rules; returns how many characters ``PairTokenizer`` handed the tokenizer for one of them."""
    rows, counts, truncated = whole_text(tokenizer, max_length, sentences)
    for rule in POOLING_RULES:
        spy = Spy(tokenizer)
        got = PairTokenizer(spy, max_length, rule)(sentences)
        starts = [0 if n is None or (rule == "instructor" and n <= 1) else n for n in counts]
        for i, s in enumerate(sentences):
            if (got.ids[i], got.pool_start[i], got.truncated[i]) != (rows[i], starts[i], truncated[i]):
                shown = repr(s)[:200]
                pytest.fail(f"max_length {max_length}, {rule}: sentence {i} {shown} differs from the whole text")
    return sum(spy.calls)


class Spy:
    """The tokenizer, counting the characters each call hands it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls: list[int] = []

    def __call__(self, texts, *args, **kwargs):
        self.calls.append(len(texts) if isinstance(texts, str) else sum(len(t) for t in texts))
        return self.tokenizer(texts, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def _words(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    vocabulary = "the climate warming ocean ice sheet carbon dioxide emissions temperature record".split()
    return " ".join(rng.choice(vocabulary) for _ in range(n))


def test_defect9_real_articles_cut_give_the_whole_text_result(tokenizer):
    """Real articles (single and joined into long ones) under real instructions: at small lengths nearly every
    article is cut, at 512 the long ones are; each equals the whole text, for both pooling rules."""
    data = shared_data_dir()
    if data is None:
        pytest.skip("needs ../shared/data/climate_fever_articles.jsonl (or FASTINSTRUCTOR_DATA)")
    articles = [text for _, text in read_jsonl_texts(data / "climate_fever_articles.jsonl")]
    longest = sorted(articles, key=len)[-40:]
    joined = [" ".join(articles[i : i + 50]) for i in range(0, 400, 50)]  # 8 texts of ~30k characters
    texts = longest + joined
    sentences = [[INSTRUCTIONS[i % len(INSTRUCTIONS)], t] for i, t in enumerate(texts)] + texts[:10]
    characters = sum(len(t) for t in texts)
    for max_length in (8, 64, 512):
        tokenized = assert_same_as_whole_text(tokenizer, max_length, sentences)
        assert tokenized < characters / 2, f"max_length {max_length}: few texts were cut, the test proves little"


def _adversarial(max_length: int) -> list:
    """Texts where characters per token run from 0 (whitespace) to unbounded (one word), around the cut."""
    big = 24 * max_length + 4096  # characters: past the cut's first bound (8 per token) and its doublings
    spaces = " " * big
    texts = [
        spaces + "word",  # stripped away: one word
        "word" + spaces + "word",
        _words(max_length + 5) + spaces + _words(max_length),  # a space run just after enough words
        _words(max_length // 2) + spaces + _words(2 * max_length),  # ... and one before them
        "x" * big,  # one huge word
        "x" * big + " " + _words(2 * max_length),
        _words(2 * max_length) + " " + "y" * big,
        "气候变化是指气温和天气模式的长期变化" * (big // 18),  # CJK without spaces
        "气候变化 " * (big // 5),
        "🌍👩‍👩‍👧‍👦🏳️‍🌈🇺🇳 " * (big // 20),  # emoji, ZWJ sequences, flags
        "🌍👩‍👩‍👧‍👦🏳️‍🌈🇺🇳" * (big // 20),
        "e\u0301 \u0301a \u0301" * (big // 7),  # combining marks after and before spaces
        "a \u00b4b \u00b4 " * (big // 7),  # ´ normalizes to space + combining acute: a word boundary from nowhere
        "\u0600 a\u0600 \u0600b " * (big // 8),  # Arabic number sign (grapheme Prepend): glues to what follows
        "tab\tnew\nline\r\nnbsp\u00a0ideo\u3000zw\u200bend\x00ctl\x1fsep " * (big // 45),
        "</s> <extra_id_0>x<pad> y <unk>" * (big // 30),  # special tokens typed in the text
        "ﬁ ﬂ ｆｕｌｌ ｗｉｄｔｈ ① ㍿ " * (big // 20),  # compatibility characters NFKC rewrites
    ]
    # A long run of mixed whitespace starting at character positions on both sides of the cut's first bound.
    text = _words(4 * max_length + 100)  # about 28 characters per token of max_length
    for start in sorted({max(1, round(max_length * f)) for f in (1, 2, 4, 6, 7, 7.5, 8, 8.5, 9, 12, 16, 24)}):
        texts.append(text[:start] + " \t\n\u3000 " * (big // 5) + text[start:])
    # Graphemes that normalize or split differently when cut, and special tokens, astride the first bound (8
    # characters per token), in dense text and after max_length - 2 one-token words: there the tokens of the
    # word that is cut would be among the first max_length - 1.
    sparse = "a       " * (max_length - 2) + " " * 16 + _words(2 * max_length)
    for glue in ("\u0600 ", " \u0301", "e\u0301", "👩\u200d👩\u200d👧", "🇺🇳", "</s>", "<extra_id_0>", "\r\n"):
        for at in range(8 * max_length - 2, 8 * max_length + 1):
            texts += [text[:at] + glue + text[at:], sparse[:at] + glue + sparse[at:]]
    # Token counts from max_length - 3 to max_length + 3, with characters per token from 2 to 33.
    for n in range(max(1, max_length - 3), max_length + 4):
        texts += [_words(n), "a " * n, "abcdefgh " * n, "abcdefgh" * 4 + " " + "a " * n]
    instructions = [
        "Represent the Wikipedia document for retrieval:",
        "",
        "Represent:",
        _words(2 * max_length, seed=1) + ":",  # an instruction longer than max_length
        spaces + "Represent the sentence: " + spaces,
        "x" * big,
    ]
    return [[instructions[i % len(instructions)], t] for i, t in enumerate(texts)] + texts


@pytest.mark.parametrize("max_length", [1, 7, 64, 512])
def test_defect9_adversarial_texts_cut_give_the_whole_text_result(tokenizer, max_length):
    assert_same_as_whole_text(tokenizer, max_length, _adversarial(max_length))


def test_defect9_random_texts_cut_give_the_whole_text_result(tokenizer):
    """Random strings over the characters that stress normalization and word splitting, cut at many places."""
    alphabet = list("ab cd ") + [
        "  ",
        "\t",
        "\n",
        "\u00a0",
        "\u3000",
        "\u200b",
        "\u0301",
        "\u00b4",
        "\u0600",
        "\u200d",
        "🌍",
        "🇺",
        "气",
        "ﬁ",
        "</s>",
        "<extra_id_1>",
        "x" * 40,
    ]
    rng = random.Random(13)
    for max_length in (1, 3, 8, 24):
        texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 60 * max_length))) for _ in range(150)]
        sentences = [[rng.choice(alphabet) + rng.choice(texts)[:20], t] for t in texts[:75]] + texts[75:]
        assert_same_as_whole_text(tokenizer, max_length, sentences)


def test_defect9_tokenizer_never_sees_a_whole_long_text(tokenizer):
    """A 4 MiB text (as text, and as an instruction) reaches the tokenizer only as a prefix of bounded length,
    and costs about what a 40 KiB one does (a ratio measured in this run, never an absolute time)."""
    spy = Spy(tokenizer)
    pairs = PairTokenizer(spy, 512)
    huge, small = _words(600_000), _words(6_000)  # about 4.2 MiB and 42 KiB
    assert len(huge) > 4 * MiB
    result = pairs([["Represent the document:", huge], [huge, "a claim"], huge])
    assert result.truncated == [True, True, True] and all(len(row) == 512 for row in result.ids)
    assert max(spy.calls) < 64 * 1024, f"the tokenizer was handed {max(spy.calls):,} characters in one call"
    assert sum(spy.calls) < 256 * 1024, f"the tokenizer was handed {sum(spy.calls):,} characters in all"

    def seconds(text: str) -> float:
        best = float("inf")
        for _ in range(5):
            pairs.instruction_length.cache_clear()
            start = time.perf_counter()
            pairs([["Represent the document:", text]])
            best = min(best, time.perf_counter() - start)
        return best

    seconds(small)  # warm-up
    ratio = seconds(huge) / seconds(small)
    assert ratio < 5, f"a 4 MiB text took {ratio:.1f} times as long as a 40 KiB one: its cost grows with its length"
