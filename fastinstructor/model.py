"""``fastinstructor.load`` and ``Instructor.encode``: the pipeline of docs/design.md section 3.

tokenize (for a backend off the CPU, a large input in chunks, the next chunk in a background thread) -> plan batches
(sorted by length within a chunk, token budget) -> pad or pack (a background thread, ahead of the backend) ->
backend.embed / embed_packed -> back to input order. For a backend that computes with PyTorch on the CPU, all of it
runs on ``compute_thread``, whichever thread calls.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from contextlib import closing

import torch
import torch.nn.functional as F

from . import compute_thread
from .backends import get_backend_class
from .backends.base import (
    Backend,
    batch_inputs,
    check_precision,
    embed_inputs,
    takes_large_batches,
    uses_compute_thread,
)
from .batching import DEFAULT_ENCODE_POLICY, BatchPolicy, default_policy
from .checkpoint import Checkpoint, load_checkpoint
from .hardware import device_type, set_threads
from .precisions import canonical_precision
from .prefetch import prefetch
from .tokenization import PairTokenizer, check_sentences, load_tokenizer
from .vectors import check_output_precision, cos_sim, quantize_embeddings

__all__ = ["DEFAULT_DOCUMENT_INSTRUCTION", "DEFAULT_QUERY_INSTRUCTION", "Instructor", "load", "tokenize_chunk_rows"]

# encode_query's and encode_document's instructions unless the model is given others: LangChain's
# HuggingFaceInstructEmbeddings defaults (query_instruction, embed_instruction), the most used INSTRUCTOR retrieval
# pair, also LlamaIndex's InstructorEmbedding's defaults for INSTRUCTOR models.
DEFAULT_QUERY_INSTRUCTION = "Represent the question for retrieving supporting documents: "
DEFAULT_DOCUMENT_INSTRUCTION = "Represent the document for retrieval: "

# encode tokenizes a large input in chunks when its backend runs on another device than the host's CPU (a GPU): the
# next chunk in a background thread while the backend runs the current chunk's batches, so that the host tokenizes
# while the device computes. A backend on the CPU keeps the cores busy itself: tokenizing beside it would save nothing
# (tokenization is under 1% of its time: 0.4-0.6M tokens/s against the cpu and onnx backends' 1.6-4.3k on 2 cores,
# docs/design.md section 6), and planning each chunk alone pads more, so encode tokenizes all at once there.
# The size: each chunk is planned alone (sorted by length within it), so each ends in one batch that may be partly
# full, and sorting fewer texts pads more. 8,192 texts hold 256 of encode's default 32-row batches and pad them 0.9%
# more than planning the whole input does (4,096 texts: 2.2%; bench/results/host-pipeline-chunked-2026-12-01-vm.md);
# at least 8 batches of the policy's max_rows keep the partly full batch to about 1/8 of a chunk's batches for the
# packed policy's 1,024 rows (48 batches instead of 45 there). Larger would start the device later: nothing overlaps
# the first chunk's tokenization (about 1 s for 8,192 mixed texts on 2 cores).
TOKENIZE_CHUNK_ROWS = 8192
TOKENIZE_CHUNK_BATCHES = 8


def tokenize_chunk_rows(policy: BatchPolicy, device: torch.device) -> int | None:
    """How many texts ``encode`` tokenizes at a time under ``policy`` for a backend on ``device``; None (all at once)
    on the CPU (see ``TOKENIZE_CHUNK_ROWS``)."""
    if device.type == "cpu":
        return None
    return max(TOKENIZE_CHUNK_ROWS, TOKENIZE_CHUNK_BATCHES * policy.max_rows)


class Instructor:
    """An INSTRUCTOR model bound to one backend; ``encode`` is a drop-in for ``InstructorEmbedding.INSTRUCTOR``, and
    ``encode(texts, prompt=...)``, ``encode_query``, ``encode_document`` and ``similarity`` for sentence-transformers'.

    ``precision`` is the precision the backend computes in; ``query_instruction`` and ``document_instruction`` are the
    instructions ``encode_query`` and ``encode_document`` use unless given another (settable).
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        backend: Backend,
        tokenizer: PairTokenizer,
        precision: str,
        backend_report: dict,
        query_instruction: str = DEFAULT_QUERY_INSTRUCTION,
        document_instruction: str = DEFAULT_DOCUMENT_INSTRUCTION,
    ) -> None:
        self.checkpoint = checkpoint
        self.backend = backend
        self.tokenizer = tokenizer
        self.precision = precision
        self.backend_report = backend_report  # what the dispatcher chose, its parity figures, what it skipped
        self.query_instruction = query_instruction
        self.document_instruction = document_instruction
        # encode calls waiting for the compute thread at once share its batches (compute_thread.Coalescer)
        self._coalesce = compute_thread.Coalescer(self._embed_many)

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def dim(self) -> int:
        """Embedding size: the Dense output (768 for INSTRUCTOR), or d_model without a Dense."""
        return self.checkpoint.out_dim

    @property
    def max_seq_length(self) -> int:
        return self.tokenizer.max_length

    def __repr__(self) -> str:
        return (
            f"Instructor(path={str(self.checkpoint.path)!r}, backend={self.backend_name!r}, "
            f"precision={self.precision!r}, dim={self.dim}, max_seq_length={self.max_seq_length})"
        )

    def encode(
        self,
        sentences: Sequence | str,
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
        output_value: str = "sentence_embedding",
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        device: str | None = None,
        normalize_embeddings: bool = True,
        max_batch_tokens: int | None = None,
        prompt: str | None = None,
        precision: str = "float32",
    ):
        """Embed ``[instruction, text]`` pairs (or plain strings) and return them in input order.

        Same arguments and return types as ``InstructorEmbedding.INSTRUCTOR.encode``: a float32 numpy array
        ``[N, dim]`` by default, a stacked tensor with ``convert_to_tensor``, a list of tensors with
        ``convert_to_numpy=False``, and a single vector for a single string.
        ``max_batch_tokens`` additionally bounds each batch by padded tokens (rows x longest row).

        When neither ``batch_size`` nor ``max_batch_tokens`` is given, the backend decides: 32 rows per batch and no
        token budget (the authors' default) on every backend but one with ``large_batches`` (the triton backend),
        which gets ``DEFAULT_PACKED_POLICY`` (up to 1,024 rows and 65,536 real tokens per batch, to keep a GPU busy;
        padding costs it nothing). Either argument given: ``batch_size`` rows (default 32) and
        ``max_batch_tokens`` padded tokens, on every backend. The batches change only speed, not the embeddings.

        On a backend that runs off the CPU (a GPU), an input of more than ``tokenize_chunk_rows`` texts (8,192, or 8
        batches of the policy's rows) is tokenized a chunk at a time, the next chunk in a background thread while the
        backend embeds the current one; batches are then planned within each chunk.

        As sentence-transformers' ``encode``: ``prompt`` is the instruction for every text (``sentences`` are then plain
        strings), and ``precision`` quantizes the output: ``"float32"`` (default), ``"int8"`` or ``"uint8"`` (ranges
        from these embeddings, so quantize many at once, or use ``fastinstructor.quantize_embeddings`` with fixed
        ranges), ``"binary"`` or ``"ubinary"`` (one bit per dimension, packed); byte for byte as
        ``sentence_transformers.quantize_embeddings`` (``fastinstructor.vectors``). It is not the precision the model
        computes in (``fastinstructor.load``'s ``precision``).

        On the CPU (cpu and reference backends) every call runs on ``fastinstructor.compute_thread``, whichever thread
        makes it; calls from several threads at once (float32 output, no progress bar, the same batch arguments) are
        embedded together there, as one input, and each caller gets its own rows.
        """
        if output_value != "sentence_embedding":
            raise ValueError(f"output_value {output_value!r} is not supported; only 'sentence_embedding' is")
        if device is not None and device_type(device) != self.backend.device.type:
            raise ValueError(
                f"this model runs on {self.backend.device}; pass device= to fastinstructor.load "
                f"instead of encode (got device={device!r})"
            )
        if batch_size is None and max_batch_tokens is None:
            policy = default_policy(takes_large_batches(self.backend))
        else:  # checked before any work
            policy = BatchPolicy(DEFAULT_ENCODE_POLICY.max_rows if batch_size is None else batch_size, max_batch_tokens)
        check_output_precision(precision)
        single = isinstance(sentences, str)  # as the authors' encode: only a bare string is one input
        if single:
            sentences = [sentences]
        if prompt is not None:
            sentences = _with_prompt(sentences, prompt)
        check_sentences(sentences)  # every input, before any work (a chunk is tokenized only when its turn comes)
        self.tokenizer.warn_if_full(sentences)
        if uses_compute_thread(self.backend) and precision == "float32" and not show_progress_bar:
            out = self._coalesce((policy, normalize_embeddings), list(sentences))
        else:
            out = self._encode_alone(sentences, policy, normalize_embeddings, precision, show_progress_bar)
        if convert_to_tensor:
            result = out
        elif convert_to_numpy:
            result = out.numpy()
        else:
            result = list(out)
        return result[0] if single else result

    def _encode_alone(
        self, sentences: Sequence, policy: BatchPolicy, normalize: bool, precision: str, show_progress_bar: bool | None
    ) -> torch.Tensor:
        progress = _progress(len(sentences), show_progress_bar)
        stop = threading.Event()
        try:
            return self._run(
                self._embed_sentences,
                sentences,
                policy,
                normalize,
                precision,
                _stoppable(progress.update, stop.is_set),
                stop=stop,
            )
        finally:
            progress.close()

    def _embed_many(self, key: tuple[BatchPolicy, bool], items: list[list], stopped: Callable[[], bool]) -> list:
        """On the compute thread: the texts of ``encode`` calls made at once (float32 output, no progress bar), as
        one input; each call's embeddings."""
        policy, normalize = key
        on_batch = _stoppable(None, stopped)
        out = self._embed_sentences([s for item in items for s in item], policy, normalize, "float32", on_batch)
        return [part.clone() for part in out.split([len(item) for item in items])]

    def encode_query(self, sentences: Sequence[str] | str, prompt: str | None = None, **kwargs):
        """``encode(sentences, prompt=...)`` with ``prompt`` defaulting to ``query_instruction``."""
        return self.encode(sentences, prompt=self.query_instruction if prompt is None else prompt, **kwargs)

    def encode_document(self, sentences: Sequence[str] | str, prompt: str | None = None, **kwargs):
        """``encode(sentences, prompt=...)`` with ``prompt`` defaulting to ``document_instruction``."""
        return self.encode(sentences, prompt=self.document_instruction if prompt is None else prompt, **kwargs)

    def similarity(self, embeddings1, embeddings2) -> torch.Tensor:
        """Cosine similarity of every embedding of ``embeddings1`` with every one of ``embeddings2``: a float32 tensor
        ``[N1, N2]`` (numpy arrays, tensors, lists of either; a single vector is one row), as sentence-transformers'
        ``similarity`` with its default cosine function. INSTRUCTOR embeddings are unit norm: cosine is the dot product.
        """
        return self._run(cos_sim, embeddings1, embeddings2)

    def _run(self, fn: Callable[..., torch.Tensor], *args, stop: threading.Event | None = None) -> torch.Tensor:
        """``fn(*args)`` on the compute thread when the backend computes with PyTorch on the CPU (``stop`` set if
        this caller is interrupted meanwhile), else on this thread (``fastinstructor.compute_thread``)."""
        if uses_compute_thread(self.backend):
            return compute_thread.run(fn, *args, stop=stop)
        return fn(*args)

    def _embed_sentences(
        self, sentences: Sequence, policy: BatchPolicy, normalize: bool, precision: str, on_batch: Callable
    ) -> torch.Tensor:  # [N, dim] in input order: float32, or the output precision's integers
        out = self._tokenize_and_embed(sentences, policy, on_batch)
        if normalize:
            out = F.normalize(out, p=2, dim=1)
        if precision != "float32":
            out = torch.from_numpy(quantize_embeddings(out.numpy(), precision))
        return out

    def _tokenize_and_embed(
        self, sentences: Sequence, policy: BatchPolicy, on_batch: Callable[[int], object]
    ) -> torch.Tensor:  # [N, dim] float32, input order
        """``embed_tokens`` of the tokenized ``sentences``. For a backend off the CPU, more than
        ``tokenize_chunk_rows`` of them are tokenized a chunk at a time, the next chunk in a background thread
        (``prefetch``, one chunk ahead: the fast tokenizer releases the GIL) while the backend runs the current chunk's
        batches; one chunk takes no thread."""
        size = tokenize_chunk_rows(policy, self.backend.device)
        if size is None or len(sentences) <= size:
            tokenized = self.tokenizer(sentences)
            return self._embed_tokens(tokenized.ids, tokenized.pool_start, policy, on_batch)
        sentences = list(sentences)  # any Sequence: sliced below
        starts = range(0, len(sentences), size)
        out = torch.empty((len(sentences), self.dim), dtype=torch.float32)
        with closing(
            prefetch(lambda start: self.tokenizer(sentences[start : start + size]), starts, depth=1)
        ) as chunks:
            for start, tokenized in zip(starts, chunks, strict=True):
                rows = slice(start, start + len(tokenized.ids))
                out[rows] = self._embed_tokens(tokenized.ids, tokenized.pool_start, policy, on_batch)
        return out

    def embed_tokens(
        self,
        ids: list[list[int]],
        pool_start: list[int],
        policy: BatchPolicy | None = None,
        on_batch: Callable[[int], object] | None = None,
    ) -> torch.Tensor:  # [N, dim] float32, input order
        """The pipeline after tokenization: batches cut by ``policy`` (sorted by length; default: ``encode``'s for
        this backend) through the backend, back in input order. ``on_batch(rows)`` is called after each batch
        (progress reporting).

        A background thread (``prefetch``) builds the next batches' tensors while the backend runs the current
        one: ``pack_batch`` for a backend that takes packed batches (``packed_input``), else ``pad_batch``; in
        pinned memory when the backend runs on CUDA. Each batch's result is copied back to the host after the
        next batch has been handed to the backend, so that a GPU has the next batch queued while the host waits.
        The whole of it runs on the compute thread when the backend computes with PyTorch on the CPU.
        """
        _check_tokens(ids, pool_start, self.checkpoint.config.vocab_size)
        stop = threading.Event()
        return self._run(self._embed_tokens, ids, pool_start, policy, _stoppable(on_batch, stop.is_set), stop=stop)

    def _embed_tokens(
        self, ids: list[list[int]], pool_start: list[int], policy: BatchPolicy | None, on_batch: Callable[[int], object]
    ) -> torch.Tensor:
        backend = self.backend
        policy = default_policy(takes_large_batches(backend)) if policy is None else policy
        plan = policy.plan([len(row) for row in ids])

        def make(rows: list[int]):
            return batch_inputs(backend, [ids[i] for i in rows], [pool_start[i] for i in rows])

        out = torch.empty((len(ids), self.dim), dtype=torch.float32)

        def collect(rows: list[int], result: torch.Tensor) -> None:
            out[rows] = result.float().cpu()
            on_batch(len(rows))

        running: list = []  # the device batch handed to the backend last, copied back after the next is queued
        batches = prefetch(make, plan) if len(plan) > 1 else (make(rows) for rows in plan)  # 1 batch: no thread
        with closing(batches):
            for rows, batch in zip(plan, batches, strict=True):
                result = embed_inputs(backend, batch)
                if running:
                    collect(*running.pop())
                if result.device.type == "cpu":
                    collect(rows, result)
                else:
                    running.append((rows, result))
        if running:
            collect(*running.pop())
        return out


def _with_prompt(sentences: Sequence, prompt: str) -> list[list[str]]:
    """``[prompt, text]`` pairs of plain ``sentences``; a pair among them is an error (two instructions for it)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str (the instruction), got {type(prompt).__name__}")
    if not isinstance(sentences, Sequence):
        raise TypeError(f"sentences must be a list of str when prompt is given, got {type(sentences).__name__}")
    for i, text in enumerate(sentences):
        if not isinstance(text, str):
            raise TypeError(
                f"sentences[{i}] is {type(text).__name__}; with prompt= every input must be a plain str (the prompt is "
                "its instruction). Pass [instruction, text] pairs without prompt= instead."
            )
    return [[prompt, text] for text in sentences]


class _Abandoned(Exception):
    """Raised on the compute thread at a batch's end when its callers stopped waiting (``compute_thread``)."""


def _stoppable(on_batch: Callable[[int], object] | None, stopped: Callable[[], bool]) -> Callable[[int], None]:
    """``on_batch``, raising ``_Abandoned`` instead once ``stopped()``."""

    def step(rows: int) -> None:
        if stopped():
            raise _Abandoned("the caller stopped waiting")
        if on_batch is not None:
            on_batch(rows)

    return step


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, show: bool | None):
    if not show:
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="text", desc="Embedding")


def _check_tokens(ids: list[list[int]], pool_start: list[int], vocab_size: int) -> None:
    """A ValueError naming the first row no backend embeds right (ONNX's Gather would take a negative id silently)."""
    if len(ids) != len(pool_start):
        raise ValueError(f"ids has {len(ids)} rows and pool_start {len(pool_start)}: pass one pool start per row")
    for i, (row, start) in enumerate(zip(ids, pool_start, strict=True)):
        if len(row) == 0:
            raise ValueError(f"ids[{i}] is empty: a row holds at least its </s> token")
        if min(row) < 0 or max(row) >= vocab_size:
            bad = min(row) if min(row) < 0 else max(row)
            raise ValueError(f"ids[{i}] holds token id {bad}, outside the model's vocabulary (0 to {vocab_size - 1})")
        if not 0 <= start < len(row):
            raise ValueError(f"pool_start[{i}] is {start}: it must fall within its row of {len(row)} tokens")


def load(
    model: str | os.PathLike,
    backend: str = "auto",
    precision: str = "auto",
    *,
    device: str | None = None,
    pooling_rule: str = "instructor",
    max_seq_length: int | None = None,
    cache_dir: str | None = None,
    revision: str | None = None,
    backend_options: dict | None = None,
    allow_int8: bool = True,
    min_cosine: float | None = None,
    allow_fallback: bool = True,
    parity_cache: bool = True,
    query_instruction: str = DEFAULT_QUERY_INSTRUCTION,
    document_instruction: str = DEFAULT_DOCUMENT_INSTRUCTION,
    threads: int | None = None,
) -> Instructor:
    """Load a checkpoint (folder, plain T5 encoder folder, or hub id) onto the fastest backend proven right.

    ``backend``: ``"auto"`` (default: the dispatcher's choice, see ``fastinstructor.dispatch``), ``"onnx"``
    (ONNX Runtime; float32, int8 on the CPU, float16 on CUDA), ``"cpu"`` (the project's PyTorch encoder;
    float32, bfloat16, int8), ``"triton"`` (the project's Triton kernels on CUDA; bfloat16, float16, float32,
    int8) or ``"reference"`` (transformers, float32). ``precision``: ``"auto"`` or one the
    backend supports. ``FASTINSTRUCTOR_BACKEND`` / ``FASTINSTRUCTOR_PRECISION`` replace an ``"auto"``.
    Every candidate other than the reference must pass its parity check against the float32 reference
    (docs/design.md section 5; cached on disk unless ``parity_cache=False``); an explicit request that cannot be
    honoured raises with what is available and why not. ``allow_int8=False`` keeps ``auto`` off int8;
    ``min_cosine`` demands more than the precision's tolerance; ``allow_fallback=False`` fails rather than
    degrading past the first available candidate. ``model.backend_report`` says what was chosen and why.

    ``threads``: compute on at most this many CPU threads (PyTorch's, ONNX Runtime's, the tokenizer's where it has
    not run yet: ``hardware.set_threads``, process-wide), so that several workers on one machine share its cores;
    default: every core. ``backend_options`` go to the onnx backend (``onnx_dir``). ``pooling_rule``:
    ``"instructor"`` (the authors' package, the default) or ``"sentence-transformers"`` (``prompt=`` with
    ``include_prompt=False``: no 1-token exception). ``max_seq_length``: tokens per input at most (instruction, text
    and ``</s>``), up to the checkpoint's own (512 for INSTRUCTOR), which is the default. ``query_instruction`` and
    ``document_instruction``: the model's instructions for ``encode_query`` and ``encode_document``.

    The load runs on ``fastinstructor.compute_thread``, the thread a cpu or reference model then computes on.
    """
    if threads is not None:
        set_threads(threads)  # this thread's PyTorch and the compute thread's, before the backends start
    options = {name: value for name, value in locals().items() if name != "threads"}  # every other argument
    return compute_thread.run(_load, **options)


def _load(
    model: str | os.PathLike,
    backend: str,
    precision: str,
    *,
    device: str | None,
    pooling_rule: str,
    max_seq_length: int | None,
    cache_dir: str | None,
    revision: str | None,
    backend_options: dict | None,
    allow_int8: bool,
    min_cosine: float | None,
    allow_fallback: bool,
    parity_cache: bool,
    query_instruction: str,
    document_instruction: str,
) -> Instructor:
    """``load``'s work, on the compute thread."""
    from .dispatch import choose

    from_environment = []
    if backend == "auto" and os.environ.get("FASTINSTRUCTOR_BACKEND"):
        backend = os.environ["FASTINSTRUCTOR_BACKEND"]
        from_environment.append(f"FASTINSTRUCTOR_BACKEND={backend}")
    if precision == "auto" and os.environ.get("FASTINSTRUCTOR_PRECISION"):
        precision = os.environ["FASTINSTRUCTOR_PRECISION"]
        from_environment.append(f"FASTINSTRUCTOR_PRECISION={precision}")
    try:
        precision = canonical_precision(precision, allow_auto=True)  # "fp16" is "float16"
        if backend != "auto":
            backend_class = get_backend_class(backend)  # unknown or unavailable: raises with the choices
            if precision != "auto":
                check_precision(backend_class, precision)
    except (ValueError, ImportError) as err:
        if from_environment:  # say where the value came from: the caller may not know the variable is set
            raise type(err)(f"{err} (from the environment: {', '.join(from_environment)})") from err
        raise
    if max_seq_length is not None and (isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int)):
        raise TypeError(f"max_seq_length must be an int (tokens), got {type(max_seq_length).__name__}")
    if max_seq_length is not None and max_seq_length < 1:
        raise ValueError(f"max_seq_length must be at least 1 (token), got {max_seq_length}")
    checkpoint = load_checkpoint(model, cache_dir=cache_dir, revision=revision)
    length = checkpoint.max_seq_length if max_seq_length is None else max_seq_length
    if length > checkpoint.max_seq_length:
        raise ValueError(
            f"max_seq_length={max_seq_length} exceeds the checkpoint's max_seq_length ({checkpoint.max_seq_length}): "
            "pass at most that"
        )
    tokenizer = PairTokenizer(load_tokenizer(checkpoint.path), length, pooling_rule)
    instance, candidate, report = choose(
        checkpoint,
        tokenizer,
        backend=backend,
        precision=precision,
        device=device,
        allow_int8=allow_int8,
        min_cosine=min_cosine,
        allow_fallback=allow_fallback,
        use_cache=parity_cache,
        backend_options=backend_options,
    )
    checkpoint.release_weights()
    return Instructor(
        checkpoint, instance, tokenizer, candidate.precision, report, query_instruction, document_instruction
    )
