"""INSTRUCTOR semantics (docs/design.md section 4): our reference against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import INSTRUCTIONS, assert_parity

import fastinstructor
from fastinstructor.tokenization import PairTokenizer


def independent_embedding(folder, instruction: str | None, text: str) -> np.ndarray:
    """docs/design.md section 4 written out with transformers and safetensors only, none of our loading code."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, T5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    encoder = T5EncoderModel.from_pretrained(str(folder), attn_implementation="eager").eval()
    dense = load_file(str(folder / "2_Dense" / "model.safetensors"))["linear.weight"]
    if instruction is None:
        s, n = text.strip(), 0
    else:
        s = (instruction + text.strip()).strip()
        n = len(tokenizer(instruction.strip(), truncation=True, max_length=512)["input_ids"]) - 1
        n = 0 if n <= 1 else n
    ids = tokenizer(s, truncation=True, max_length=512)["input_ids"]
    with torch.no_grad():
        hidden = encoder(input_ids=torch.tensor([ids])).last_hidden_state[0]
    mask = torch.ones(len(ids))
    mask[:n] = 0
    pooled = (hidden * mask[:, None]).sum(0) / mask.sum().clamp_min(1e-9)
    e = dense @ pooled
    return (e / e.norm().clamp_min(1e-12)).numpy()


@pytest.fixture(scope="module")
def reference(tiny_model):
    return fastinstructor.load(tiny_model, backend="reference")


@pytest.fixture(scope="module")
def one_token(reference) -> str:
    """An instruction that the trained SentencePiece model encodes as a single piece."""
    raw = reference.tokenizer.tokenizer
    return next(w for w in ("the", "of", "a", "Represent") if len(raw(w)["input_ids"]) == 2)  # piece + </s>


def test_reference_matches_sentence_transformers(tiny_model, reference, real_texts):
    """sentence-transformers with prompt=instruction and include_prompt=False; 2+ token instructions only."""
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(tiny_model), device="cpu")
    pooling = next(m for m in model if type(m).__name__ == "Pooling")
    pooling.include_prompt = False
    for instruction in INSTRUCTIONS:
        assert reference.tokenizer.instruction_length(instruction) >= 2
        expected = model.encode(real_texts, prompt=instruction, batch_size=16)
        actual = reference.encode([[instruction, t] for t in real_texts])
        assert_parity(actual, expected, "float32")


LONG = " ".join(["The global mean surface temperature rose by about one degree over the last century."] * 80)
EDGE_CASES = {
    "empty instruction": ("", "Sea ice is melting."),
    "one-token instruction": ("the", "Sea ice is melting."),
    "empty text": ("Represent the claim:", ""),
    "whitespace-only text": ("Represent the claim:", "  \t\n "),
    "text over 512 tokens": ("Represent the document:", LONG),
    "instruction over 512 tokens": (LONG, "Sea ice is melting."),
    "unicode": ("Représente la phrase :", "Ünïcödé — 温暖化 🌍 naïve café"),
    "leading and trailing whitespace": ("  Represent the claim: ", "  Sea ice is melting.  "),
    "plain string": (None, "Sea ice is melting."),
    "plain whitespace string": (None, "   "),
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_edge_cases_match_independent_computation(tiny_model, reference, one_token, case):
    instruction, text = EDGE_CASES[case]
    instruction = one_token if case == "one-token instruction" else instruction
    sentence = text if instruction is None else [instruction, text]
    actual = reference.encode([sentence])[0]
    np.testing.assert_allclose(actual, independent_embedding(tiny_model, instruction, text), atol=1e-5, rtol=0)


def test_edge_case_token_facts(reference, one_token):
    """What the rules imply, checked on the token ids and pooling starts themselves."""
    tok = reference.tokenizer
    ids, starts, truncated = tok(
        [
            ["", "Sea ice is melting."],
            "Sea ice is melting.",
            [one_token, "Sea ice"],
            ["Represent the claim:", ""],
            ["Represent the document:", LONG],
            [LONG, "Sea ice is melting."],
        ]
    )
    assert ids[0] == ids[1] and starts[0] == starts[1] == 0  # empty instruction == plain string
    assert starts[2] == 0  # a 1-token instruction is pooled (the authors' n <= 1 rule)
    assert ids[3][-1] == 1 and starts[3] == len(ids[3]) - 1  # empty text: only </s> pooled
    assert len(ids[4]) == 512 and ids[4][-1] == 1  # truncated, </s> kept last
    assert len(ids[5]) == 512 and starts[5] == 511  # instruction of 511+ tokens: only </s> pooled
    assert all(row[-1] == 1 and 0 not in row for row in ids)
    assert truncated == [False, False, False, False, True, True]


def test_sentence_transformers_rule_differs_only_for_one_token_instructions(reference, one_token):
    st_rule = PairTokenizer(reference.tokenizer.tokenizer, 512, "sentence-transformers")
    assert reference.tokenizer.instruction_length(one_token) == 0
    assert st_rule.instruction_length(one_token) == 1
    assert st_rule.instruction_length(INSTRUCTIONS[0]) == reference.tokenizer.instruction_length(INSTRUCTIONS[0])
    with pytest.raises(ValueError, match="pooling_rule"):
        PairTokenizer(reference.tokenizer.tokenizer, 512, "mean")


def test_load_with_sentence_transformers_rule(tiny_model, real_texts, one_token):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(tiny_model), device="cpu")
    next(m for m in model if type(m).__name__ == "Pooling").include_prompt = False
    ours = fastinstructor.load(tiny_model, backend="cpu", pooling_rule="sentence-transformers")
    assert ours.tokenizer.instruction_length(one_token) == 1
    assert_parity(
        ours.encode([[one_token, t] for t in real_texts[:8]]),
        model.encode(real_texts[:8], prompt=one_token),
        "float32",
    )


def test_instruction_lengths_are_cached(tiny_model):
    model = fastinstructor.load(tiny_model, backend="cpu")
    model.tokenizer.instruction_length.cache_clear()  # the parity check at load may have filled it
    model.encode([[INSTRUCTIONS[0], f"text number {i}"] for i in range(50)])
    info = model.tokenizer.instruction_length.cache_info()
    assert info.misses == 1 and info.hits == 50  # 50 texts tokenized, and the check that it leaves them room
