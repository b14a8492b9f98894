"""The embed job on Ray against the local job, on this machine: rows/s, and what Ray costs.

Contenders, each a whole job from an empty output folder (read the JSON Lines file, embed, write Parquet shards and
the manifest), timed with interleaved repeats on one local Ray cluster (``ray.init(num_cpus=CPUS)``, started once):

- ``local``: ``fastinstructor.embed_corpus`` in this process with ``threads=CPUS``, loading the model (as
  ``fastinstructor embed`` does);
- ``local, model loaded``: the same with the model already loaded (the embedding and writing alone);
- ``ray, 1 actor``: ``fastinstructor.ray.embed_dataset`` in two parts, run one after the other by one actor of
  ``CPUS`` CPUs (its threads);
- ``ray, 2 actors``: the two parts at once, in two actors of ``CPUS / 2`` CPUs each.

A Ray job starts its actors, each loads the model from the node's copy, runs its part, and the actors are killed; the
model is shipped once before the runs (that time is reported apart, as is the cluster's start). Every output is
checked against the local one (max abs difference). On a machine of 2 cores no gain is expected from 2 actors: the
figures show what the Ray machinery costs there.

    .venv/bin/python bench/bench_ray.py [--model DIR] [--rows 1024] [--repeat 2] [--cpus 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import DEFAULT_MODEL, DEFAULT_OUT, command, ensure_model, machine, require_shared_data, write_results

import fastinstructor
from fastinstructor.benchmark import interleaved, markdown_table, record
from fastinstructor.data import read_jsonl_texts

INSTRUCTION = "Represent the Wikipedia document for retrieval:"


def report(result: dict) -> str:
    """The Markdown body of a result (its JSON holds everything it shows)."""
    table = result["contenders"]
    header = ["contender", "median s", "min–max s", "rows/s", "real tokens/s", "× local", "overhead s", "max abs"]
    lines = [
        [
            c["name"],
            f"{c['median_s']:.2f}",
            f"{min(c['times_s']):.2f}–{max(c['times_s']):.2f}",
            f"{c['rows_per_s']:.1f}",
            f"{c['tokens_per_s']:,.0f}",
            f"{c['vs_local']:.2f}",
            f"{c['overhead_s']:+.2f}",
            f"{c['max_abs_vs_local']:.1e}",
        ]
        for c in table
    ]
    r = result
    intro = (
        f"{r['rows']} evidence sentences ({r['real_tokens']} real tokens), instruction {INSTRUCTION!r}, shards of "
        f"{r['shard_rows']} rows, random-weight checkpoint {Path(r['model']).name} on the cpu backend in float32; a "
        f"local Ray {r['ray']} cluster of {r['cpus']} CPUs (started in {r['cluster_start_s']:.1f} s; the model shipped "
        f"to it once in {r['ship_model_s']:.2f} s, not in the times below). Each time is a whole job into an empty "
        f"folder, median of {len(table[0]['times_s'])} interleaved passes; `overhead s` is the contender's median "
        "minus the local job's; `max abs` compares its output with the local job's."
    )
    load = max(value for c in table for value in c["loadavg_1m_after"])
    intro += f" Highest 1-minute load average after a pass: {load:.1f} (other work on the machine shows there)."
    return "\n\n".join([intro, markdown_table(header, lines), machine(result)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint (base preset built if absent)")
    parser.add_argument("--rows", type=int, default=1024, help="evidence sentences (default 1024)")
    parser.add_argument("--shard-rows", type=int, default=256, help="rows per shard (default 256)")
    parser.add_argument("--repeat", type=int, default=2, help="interleaved timed passes per contender (default 2)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="the cluster's CPUs (default: every core)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    import ray

    import fastinstructor.ray as fray

    ensure_model(args.model)
    data = require_shared_data("bench_ray")
    rows = read_jsonl_texts(data / "climate_fever_evidence.jsonl", args.rows)
    workdir = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    corpus = workdir / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in rows), encoding="utf-8")
    load_options = {"backend": "cpu", "precision": "float32"}
    job = {"instruction": INSTRUCTION, "shard_rows": args.shard_rows, "quiet": True}
    model = fastinstructor.load(args.model, threads=args.cpus, **load_options)
    tokens = sum(len(ids) for ids in model.tokenizer([[INSTRUCTION, t] for _, t in rows]).ids)

    started = time.perf_counter()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    cluster_s = time.perf_counter() - started
    started = time.perf_counter()
    shipped = fray.ship_model(args.model)
    ship_s = time.perf_counter() - started

    def fresh(name: str) -> Path:
        out = workdir / name
        shutil.rmtree(out, ignore_errors=True)
        return out

    def local() -> Path:
        out = fresh("local")
        fastinstructor.embed_corpus(args.model, corpus, out, threads=args.cpus, **load_options, **job)
        return out

    def local_loaded() -> Path:
        out = fresh("local-loaded")
        fastinstructor.embed_corpus(model, corpus, out, **job)
        return out

    def on_ray(actors: int):
        def run() -> Path:
            out = fresh(f"ray-{actors}")
            cpus = args.cpus / actors
            fray.embed_dataset(
                shipped, corpus, out, parts=2, actors=actors, num_cpus=cpus, load_options=load_options, **job
            )
            return out

        return run

    runs = {
        "local": local,
        "local, model loaded": local_loaded,
        f"ray, 1 actor (num_cpus={args.cpus:g}), 2 parts": on_ray(1),
        f"ray, 2 actors (num_cpus={args.cpus / 2:g} each), 2 parts": on_ray(2),
    }
    model.encode([[INSTRUCTION, t] for _, t in rows[:8]])  # warm-up
    times, loadavg, last = interleaved(runs, args.repeat)
    ray.shutdown()
    reference_ids, reference = fastinstructor.read_embeddings(last["local"])
    base = statistics.median(times["local"])
    table = []
    for name in runs:
        ids, vectors = fastinstructor.read_embeddings(last[name])
        assert ids == reference_ids, f"{name}: the ids differ from the local job's"
        median = statistics.median(times[name])
        table.append(
            {
                "name": name,
                "times_s": times[name],
                "loadavg_1m_after": loadavg[name],
                "median_s": median,
                "rows_per_s": len(rows) / median,
                "tokens_per_s": tokens / median,
                "vs_local": base / median,
                "overhead_s": median - base,
                "max_abs_vs_local": float(np.abs(vectors - reference).max()),
            }
        )
    shutil.rmtree(workdir, ignore_errors=True)

    result = record(
        command("bench_ray.py"),
        rows=len(rows),
        real_tokens=tokens,
        shard_rows=args.shard_rows,
        cpus=args.cpus,
        model=str(args.model),
        backend="cpu",
        precision="float32",
        ray=ray.__version__,
        cluster_start_s=cluster_s,
        ship_model_s=ship_s,
        contenders=table,
    )
    body = report(result)
    write_results(args.out, "ray", result, f"Embed job on Ray against the local job, {result['date']}", body)
    print(body)


if __name__ == "__main__":
    main()
