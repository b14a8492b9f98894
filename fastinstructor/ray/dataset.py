"""Embedding on Ray: the ``Embedder`` callable class for ``ray.data.Dataset.map_batches``, and ``embed_dataset``,
the embed job run as Ray actors, one local job part (``embed_corpus``'s ``num_shards``, ``shard_index``) at a time.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import ray

from .shipping import ShippedFolder, load_on_worker, ship_model

__all__ = ["Embedder", "embed_dataset", "embed_from_args"]


def _texts(batch, name: str) -> list[str]:
    """A column of texts of a pyarrow Table, a pandas DataFrame or a dict of numpy arrays, as a list; a TypeError
    naming the column and the row for a value that is no text (a null, a NaN)."""
    if hasattr(batch, "column_names"):  # pyarrow.Table
        if name not in batch.column_names:
            raise KeyError(f"the batch has no column {name!r} (columns: {batch.column_names})")
        values = batch.column(name).to_pylist()
    else:
        if name not in batch:
            raise KeyError(f"the batch has no column {name!r} (columns: {list(batch.keys())})")
        column = batch[name]
        values = column.tolist() if hasattr(column, "tolist") else list(column)
    for row, value in enumerate(values):
        if not isinstance(value, str):
            raise TypeError(
                f"column {name!r}, row {row} of this batch, is {value!r}, not a text: drop or fill such rows first "
                "(Dataset.filter)"
            )
    return values


def _with_column(batch, name: str, vectors: np.ndarray):
    """``batch`` with ``vectors`` ([rows, dim] float32) as the column ``name``: a fixed-size list in a pyarrow Table
    (the embed job's Parquet type), a column of arrays in a DataFrame, a 2-D array in a dict."""
    if hasattr(batch, "column_names"):
        import pyarrow as pa

        values = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
        if name in batch.column_names:
            batch = batch.drop_columns([name])
        return batch.append_column(name, values)
    if hasattr(batch, "assign"):  # pandas
        return batch.assign(**{name: list(vectors)})
    return {**batch, name: vectors}


class Embedder:
    """Embeds the ``text_column`` of each batch into a new ``output_column`` (default ``embedding``): a callable class
    for ``Dataset.map_batches``, one model load per actor.

    >>> ds.map_batches(Embedder, fn_constructor_args=(ship_model("hkunlp/instructor-large"),),
    ...                fn_constructor_kwargs={"instruction": "Represent the document for retrieval:"},
    ...                concurrency=4, num_gpus=1, batch_size=4096, batch_format="pyarrow")

    ``model``: a ``ShippedFolder`` (``ship_model``; what a cluster needs) or a path every worker can read.
    ``instruction``: one for every row; ``instruction_column``: one per row; neither: plain texts. ``backend``,
    ``precision``, ``device``, ``max_seq_length`` and other ``load`` options as ``fastinstructor.load``;
    ``threads``: the actor's assigned CPUs by default (for an actor given no CPU: 1); ``batch_size`` and
    ``max_batch_tokens`` cut each Ray batch into backend batches as ``encode`` does.
    """

    def __init__(
        self,
        model: ShippedFolder | str | os.PathLike,
        *,
        text_column: str = "text",
        instruction: str | None = None,
        instruction_column: str | None = None,
        output_column: str = "embedding",
        normalize: bool = True,
        batch_size: int | None = None,
        max_batch_tokens: int | None = None,
        threads: int | None = None,
        onnx_dir: ShippedFolder | str | os.PathLike | None = None,
        **load_options,
    ) -> None:
        if instruction is not None and instruction_column is not None:
            raise ValueError("pass either instruction (one for all rows) or instruction_column (one per row), not both")
        self.text_column, self.instruction, self.instruction_column = text_column, instruction, instruction_column
        self.output_column, self.normalize = output_column, normalize
        self.batch_size, self.max_batch_tokens = batch_size, max_batch_tokens
        self.model = load_on_worker(model, threads=threads, onnx_dir=onnx_dir, **load_options)
        if instruction is not None and self.model.tokenizer.fills_length(instruction):  # each row: one vector
            raise ValueError(
                f"the instruction takes all {self.model.max_seq_length} tokens of max_seq_length but </s>: no token "
                "of any text would be embedded; shorten it"
            )

    def __call__(self, batch):
        texts = _texts(batch, self.text_column)
        if self.instruction_column is not None:
            instructions = _texts(batch, self.instruction_column)
            sentences = [[i, t] for i, t in zip(instructions, texts, strict=True)]
        elif self.instruction is not None:
            sentences = [[self.instruction, t] for t in texts]
        else:
            sentences = texts
        if sentences:
            vectors = self.model.encode(
                sentences,
                batch_size=self.batch_size,
                max_batch_tokens=self.max_batch_tokens,
                normalize_embeddings=self.normalize,
            )
        else:
            vectors = np.zeros((0, self.model.dim), dtype=np.float32)
        return _with_column(batch, self.output_column, np.asarray(vectors, dtype=np.float32))


class _Part:
    """A Ray actor that loads the model once and runs parts of a split embed job (``embed_corpus`` with
    ``num_shards``, ``shard_index``): each part a complete, locked, resumable job folder ``OUTPUT/part-K-of-N/``."""

    def __init__(self, model: ShippedFolder, load_options: dict) -> None:
        self.model = load_on_worker(model, **load_options)

    def run(self, input: list[str], output: str, parts: int, index: int, job_options: dict) -> dict:
        from ..corpus import embed_corpus

        manifest = embed_corpus(self.model, input, output, num_shards=parts, shard_index=index, **job_options)
        return {key: manifest[key] for key in ("totals", "shards", "random_weights")}


def _slots(num_cpus: float, num_gpus: float) -> int:
    """How many actors of that size the cluster holds at once."""
    resources = ray.cluster_resources()
    if num_gpus:
        return max(1, int(resources.get("GPU", 0) // num_gpus))
    return max(1, int(resources.get("CPU", 1) // max(num_cpus, 1e-9)))


def _input_files(input, job_options: dict) -> list[str]:
    """The job's input files as absolute paths (every part reads the same files, from any worker), expanded with the
    job's input options, taken by name: any of them may be left out."""
    from ..readers import InputSpec

    spec_fields = {
        "input_format": "format",
        "text_field": "text_field",
        "id_field": "id_field",
        "instruction_field": "instruction_field",
    }
    spec = InputSpec(input, **{field: job_options[k] for k, field in spec_fields.items() if k in job_options})
    if spec.path == "-":
        raise ValueError("a Ray job cannot read standard input: pass files, a folder or a glob pattern")
    return [os.path.abspath(file) for file in spec.files]


def embed_dataset(
    model: ShippedFolder | str | os.PathLike,
    input,
    output: str | os.PathLike,
    *,
    parts: int | None = None,
    actors: int | None = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
    max_retries: int = 1,
    address: str | None = None,
    shared_filesystem: bool = False,
    load_options: dict | None = None,
    **job_options,
) -> dict:
    """The embed job (``fastinstructor.embed_corpus``) on a Ray cluster: split into ``parts`` parts (default: as many
    as ``actors``), run by ``actors`` Ray actors (default: as many as the cluster holds now, at most ``parts``) of
    ``num_cpus`` CPUs (their threads) and ``num_gpus`` GPUs each, every actor loading the model once and running parts
    until none is left. Part K is the local job's part K of N
    (``num_shards``, ``shard_index``): its own job folder ``output/part-K-of-N/`` with the local job's manifest,
    checksums, lock and shard-level resume, so ``read_embeddings(output)`` reads the union in input order.

    ``input``: a file, a folder, a glob pattern or a list of these (``embed_corpus``'s), expanded here on the driver
    into absolute file paths; the input files and ``output`` must be at the same path on every node (a local
    cluster, or a shared filesystem). ``model``: as ``ship_model`` takes it, shipped once; a ValueError at once where it
    does not load on a worker (a bad load option). An actor that dies (killed,
    its node lost) has its part resumed by a new actor up to ``max_retries`` times; a part that still fails leaves its
    finished shards, the other parts complete, and this raises: call it again (or run ``fastinstructor embed --engine
    ray`` again) and only what is missing is embedded. ``load_options``: ``backend``, ``precision``, ``threads``, ...
    as ``fastinstructor.load``; ``job_options``: the other ``embed_corpus`` options (``instruction``, ``shard_rows``,
    ``dtype``, ...). Returns the parts' totals summed, their shards (part by part) and manifests' ``random_weights``.
    """
    import uuid
    from collections import deque

    from ..shards import CorpusError, split_count

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False)
    files = _input_files(input, job_options)
    output = os.path.abspath(output)
    parts = parts or split_count(Path(output))  # a job already in the folder: its own count, not the cluster's size
    actors = actors or min(parts or sys.maxsize, _slots(num_cpus, num_gpus))
    parts = parts or actors
    actors = min(actors, parts)
    if not isinstance(model, ShippedFolder):
        model = ship_model(model, shared_filesystem=shared_filesystem)
    job_options = {"quiet": True, **job_options}
    run_id = uuid.uuid4().hex[:8]
    make = ray.remote(_Part)
    created: list = []

    def new_actor():
        name = f"fastinstructor-embed-{run_id}-{len(created)}"  # named, so an operator (or a test) can find it
        actor = make.options(num_cpus=num_cpus, num_gpus=num_gpus, name=name).remote(model, load_options or {})
        created.append(actor)
        return actor

    pending, running, free = deque(range(parts)), {}, [None] * actors  # None: a slot for a new actor
    retries, results, failures = dict.fromkeys(range(parts), 0), {}, {}
    try:
        while pending or running:
            while pending and free:
                actor = free.pop(0) or new_actor()
                index = pending.popleft()
                running[actor.run.remote(files, output, parts, index, job_options)] = (index, actor)
            [done], _ = ray.wait(list(running), num_returns=1)
            index, actor = running.pop(done)
            try:
                results[index] = ray.get(done)
                if pending:
                    free.append(actor)
                else:  # nothing left for it: its CPUs and GPUs go to an actor still waiting for them
                    ray.kill(actor)
            except ray.exceptions.RayActorError as err:  # the actor died: its part resumes in a new one
                if err.actor_init_failed:  # ... unless it never loaded the model: a new one would fail the same way
                    why = str(err).strip().splitlines()[-1]
                    raise ValueError(
                        f"the model did not load on a Ray worker ({why}); fix the model or its load options and run "
                        "the job again"
                    ) from None
                free.append(None)
                if retries[index] < max_retries:
                    retries[index] += 1
                    pending.appendleft(index)
                else:
                    failures[index] = err
            except Exception as err:  # the job's own error (a bad row, a changed input): the actor is fine
                free.append(actor)
                failures[index] = err
    finally:
        for actor in created:
            ray.kill(actor)
    if failures:
        said = "; ".join(f"part {k}: {str(err).strip().splitlines()[-1]}" for k, err in sorted(failures.items()))
        raise CorpusError(
            f"{len(failures)} of {parts} part(s) of the job in {output} did not finish ({said}); the finished shards "
            "are kept: run the same job again to embed only what is missing"
        )
    ordered = [results[k] for k in range(parts)]
    totals: dict = {}
    for result in ordered:
        for key, value in result["totals"].items():
            totals[key] = totals.get(key, 0) + value
    shards = [shard for result in ordered for shard in result["shards"]]
    return {
        "output": output,
        "parts": parts,
        "totals": totals,
        "shards": shards,
        "random_weights": any(r["random_weights"] for r in ordered),
    }


def embed_from_args(args) -> int:
    """``fastinstructor embed --engine ray``: ``embed_dataset`` with the command's options; the parts: ``--num-shards``
    (default: one per actor the cluster holds), each actor ``--threads`` CPUs (default 1) and ``--actor-gpus`` GPUs."""
    import inspect

    from ..corpus import embed_corpus

    if args.shard_index is not None:
        raise ValueError("--engine ray runs every part itself: give --num-shards N (or nothing), not --shard-index")
    loading = ("backend", "precision", "pooling_rule", "max_seq_length", "threads")
    taken = set(inspect.signature(embed_corpus).parameters) - {"model", "input", "output", "num_shards", "shard_index"}
    job = {key: value for key, value in vars(args).items() if key in taken and key not in loading}
    if not ray.is_initialized():
        ray.init(address=args.address, include_dashboard=False)
    start = time.perf_counter()
    summary = embed_dataset(
        args.model,
        args.input,
        args.output,
        parts=args.num_shards,
        num_cpus=args.threads or 1,
        num_gpus=args.actor_gpus,
        load_options={key: getattr(args, key) for key in loading},
        **job,
    )
    totals = summary["totals"]
    print(
        f"embedded {totals['rows']} rows ({totals['tokens']} real tokens) into {len(summary['shards'])} shard(s) in "
        f"{summary['parts']} part(s) of {summary['output']} on Ray; skipped {totals['skipped']}, truncated "
        f"{totals['truncated']}, duplicate ids {totals['duplicate_ids']}; this run: {time.perf_counter() - start:.1f} s"
    )
    if summary["random_weights"]:
        print("NOTE: this checkpoint has RANDOM weights, so these embeddings are meaningless; the speed is real.")
    from ..shards import all_skipped

    if (why := all_skipped({"totals": totals, "shards": summary["shards"]})) is not None:
        print(f"fastinstructor embed: error: {why}", file=sys.stderr)
        return 1
    return 0
