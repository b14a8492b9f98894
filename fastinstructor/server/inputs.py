"""From a validated request to the sentences the model's ``PairTokenizer`` reads: each input's instruction (its
own, a named one, or the server's default), the text left-truncated when asked, and ``/tokenize``'s view of the
tokens. Everything goes through the model's one tokenizer; nothing here embeds."""

from __future__ import annotations

from bisect import bisect_left

from ..tokenization import PairTokenizer, lone_surrogate
from .protocol import HTTPError
from .settings import ServerSettings

__all__ = ["check_text", "instructions_for", "left_truncate", "sentences", "tokens"]


def check_text(value: str, where: str) -> None:
    """JSON can carry lone surrogates (``"\\ud800"``), which are no Unicode text: the tokenizer cannot take them."""
    at = lone_surrogate(value)
    if at is not None:
        raise HTTPError(
            400,
            f"{where} has a lone surrogate ({ascii(value[at])}) at character {at}, which is not "
            "Unicode text; send valid UTF-8 (a character beyond U+FFFF escaped as a surrogate pair)",
        )


def instructions_for(request, count: int, settings: ServerSettings) -> list[str | None]:
    """One instruction (or None: pool the whole text) per input: the request's ``instruction``, else the named
    instruction its ``prompt_name`` selects, else the server's default instruction."""
    instruction, name = request.instruction, request.prompt_name
    if instruction is not None and name is not None:
        raise HTTPError(400, "send 'instruction' or 'prompt_name', not both", param="prompt_name")
    if name is not None:
        check_text(name, "'prompt_name'")
        named = settings.named_instructions
        if name not in named:
            known = f"the known names are {sorted(named)}" if named else "this server has no named instructions"
            raise HTTPError(
                400,
                f"unknown prompt_name {name!r}: {known} (GET /info lists them with their texts; a server is given "
                "them with --instruction NAME=TEXT)",
                param="prompt_name",
            )
        return [named[name]] * count
    if instruction is None:
        return [settings.default_instruction_text] * count
    if isinstance(instruction, str):
        check_text(instruction, "'instruction'")
        return [instruction] * count
    if len(instruction) != count:
        raise HTTPError(
            400,
            f"'instruction' has {len(instruction)} items for {count} inputs; send one instruction, or one per input",
            param="instruction",
        )
    for i, text in enumerate(instruction):
        check_text(text, f"'instruction' item {i}")
    return list(instruction)


def _texts(request, field: str) -> list[str]:
    raw = getattr(request, field)
    texts = [raw] if isinstance(raw, str) else raw
    for i, text in enumerate(texts):
        check_text(text, f"'{field}' item {i}")
    return texts


def _sentence(instruction: str | None, text: str):
    return text if instruction is None else [instruction, text]


def sentences(request, field: str, settings: ServerSettings) -> list:
    """The request's inputs as the tokenizer's sentences: ``[instruction, text]`` pairs, or plain texts."""
    texts = _texts(request, field)
    return [_sentence(i, t) for i, t in zip(instructions_for(request, len(texts), settings), texts, strict=True)]


def left_truncate(tokenizer: PairTokenizer, sentence):
    """``sentence`` with its text cut from the left, so that the model reads the instruction and the longest end
    of the text that fits in ``max_length`` tokens; unchanged when it fits. The cut falls where a word starts (where
    a token starts if the text's last word alone is too long), and the sentence is what the tokenizer then reads."""
    if not tokenizer([sentence]).truncated[0]:
        return sentence
    instruction, text = (None, sentence) if isinstance(sentence, str) else sentence
    text = text.strip()
    offset, _, encoding, first_whole, _ = tokenizer.window(text, tokenizer.max_length, from_end=True)
    starts = [start + offset for start, _ in encoding["offset_mapping"]]
    words = encoding.word_ids()
    word_starts = [k for k in range(first_whole, len(words)) if k == 0 or words[k] != words[k - 1]]

    def fits(k: int) -> bool:
        return not tokenizer([_sentence(instruction, text[starts[k] :])]).truncated[0]

    # Where the kept end most likely starts: the text's room (max_length less the instruction and </s>) counted back
    # from the window's last token. Probed first with the candidate before it, it is most often the answer: two
    # tokenizations instead of a binary search's ten or so on a 512-token model.
    room = tokenizer.max_length - 1 - (0 if instruction is None else tokenizer.instruction_length(instruction))
    for candidates in (word_starts, range(first_whole, len(words))):  # word starts, else any token's start
        low, high = 0, len(candidates)  # a later start leaves fewer tokens: find the first candidate that fits
        guess = bisect_left(candidates, len(words) - room)
        for probe in (guess, guess - 1):
            if low <= probe < high:
                low, high = (low, probe) if fits(candidates[probe]) else (probe + 1, high)
        while low < high:
            middle = (low + high) // 2
            if fits(candidates[middle]):
                high = middle
            else:
                low = middle + 1
        if low < len(candidates):
            return _sentence(instruction, text[starts[candidates[low]] :])
    return _sentence(instruction, "")  # the instruction alone fills the model's length


def tokens(tokenizer: PairTokenizer, sentence, ids: list[int], pool_start: int, add_special: bool) -> list[dict]:
    """``/tokenize``'s tokens of one sentence: ``ids`` (the tokenizer's, as embedded), each with the characters it
    covers in the text the model reads, whether it is special, inside the instruction, and pooled."""
    hf = tokenizer.tokenizer
    if isinstance(sentence, str):
        joined, instruction_chars = sentence.strip(), 0
    else:
        joined = (sentence[0] + sentence[1].strip()).strip()
        instruction_chars = min(len(sentence[0].lstrip()), len(joined))
    body = len(ids) - 1  # every row ends in </s>
    encoding = tokenizer.window(joined, body).encoding
    offsets = encoding["offset_mapping"][:body]
    if list(encoding["input_ids"][:body]) != ids[:body]:
        offsets = [(None, None)] * body  # cannot happen with a T5 tokenizer; never show offsets that do not match
    out = []
    for position, (token_id, (start, stop)) in enumerate(zip(ids[:body], offsets, strict=True)):
        text = joined[start:stop] if start is not None else hf.convert_ids_to_tokens(token_id)
        inside = start is not None and start < instruction_chars
        out.append(
            {
                "id": token_id,
                "text": text,
                "special": False,
                "start": start,
                "stop": stop,
                "instruction": inside,
                "pooled": position >= pool_start,
            }
        )
    if add_special:
        end = ids[-1]
        special = {"text": hf.convert_ids_to_tokens(end), "special": True, "start": None, "stop": None}
        out.append({"id": end, **special, "instruction": False, "pooled": True})
    return out
