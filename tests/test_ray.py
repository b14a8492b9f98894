"""fastinstructor.ray on a real local Ray cluster (issue 19): the map_batches ``Embedder`` in two actors, the model
shipped through the object store, a Ray Serve deployment of the server, and the embed job as Ray actors (equal to
the local job row for row; an actor killed mid-run, then a re-run: the same output, nothing lost or duplicated).

One cluster for the module (``ray.init(num_cpus=2)``, no dashboard, no usage report: CI runs as root offline)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'fastinstructor[ray]')")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")  # Ray Serve's own pydantic v1 fields

import fastinstructor  # noqa: E402
import fastinstructor.ray as fray  # noqa: E402

DOC = "Represent the Wikipedia document for retrieval:"


README_DOC = "Represent the document for retrieval:"  # the README's instruction


def _readme_snippets() -> list[tuple[str, str]]:
    """The code blocks of the README's Ray part (of "More than one machine"), in order: Ray Data (python), the embed
    job (bash, python), Ray Serve (bash, python)."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = text.split("## More than one machine", 1)[1].split("\n## ", 1)[0].split("**Ray**", 1)[1]
    found = re.findall(r"```(bash|python)\n(.*?)```", section, flags=re.S)
    assert [kind for kind, _ in found] == ["python", "bash", "python", "bash", "python"]
    return found


def _replaced(code: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in code, f"the README's snippet no longer has {old!r}"
        code = code.replace(old, new)
    return code


def _argv(command: str, replacements: dict[str, str]) -> list[str]:
    """A README command line as ``main``'s arguments (no ``fastinstructor``), with ``replacements`` made."""
    words = shlex.split(_replaced(command, replacements).replace("\\\n", " "))
    assert words[0] == "fastinstructor"
    return words[1:]


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def model(tiny_model):
    return fastinstructor.load(tiny_model)


@pytest.fixture(scope="module")
def shipped(cluster, tiny_model):
    return fray.ship_model(tiny_model)


def test_a_shipped_folder_is_the_same_files_on_a_worker(shipped, tiny_model, tmp_path):
    @ray.remote(num_cpus=1)
    def unpack(folder: fray.ShippedFolder) -> dict:
        path = folder.path()
        return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}

    got = ray.get(unpack.remote(shipped))
    expected = {p.relative_to(tiny_model).as_posix(): p.read_bytes() for p in fray.shipping._files(tiny_model)}
    assert got == expected and shipped.name == tiny_model.name and shipped.files
    assert fray.ship_folder(tiny_model, shared_filesystem=True).path() == tiny_model.resolve()


def test_the_same_files_shipped_under_two_names_unpack_under_each(shipped, tiny_model, tmp_path):
    """A hub snapshot (named by its commit) and a local copy of the same model: each worker path has its own name."""
    import shutil

    copy = fray.ship_folder(shutil.copytree(tiny_model, tmp_path / "a-copy"))
    assert copy.key == shipped.key
    names = ray.get(ray.remote(lambda a, b: [a.path().name, b.path().name]).remote(shipped, copy))
    assert names == [tiny_model.name, "a-copy"]


def test_a_shipped_hub_id_is_served_under_the_id_not_its_snapshots_commit(cluster, tiny_model, tmp_path, monkeypatch):
    import huggingface_hub.constants
    from test_checkpoint import _fake_hf_cache

    from fastinstructor.server.settings import served_name

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    snapshot = _fake_hf_cache(tmp_path / "hub", "hkunlp/instructor-tiny", tiny_model)
    shipped = fray.ship_model("hkunlp/instructor-tiny", cache_dir=str(tmp_path / "hub"))
    assert shipped.name == snapshot.name and served_name(shipped.source) == "hkunlp/instructor-tiny"
    model, settings, name, load_options = fray.serve_app(shipped)._bound_deployment.init_args  # the replica's
    assert name == "hkunlp/instructor-tiny" and model is shipped


def test_a_failed_serve_command_removes_no_deployment_it_did_not_make(cluster, monkeypatch):
    """`serve --engine ray --address auto --model typo` against a live cluster: the model is not found, and the
    deployment already serving stays."""
    from ray import serve

    from fastinstructor import CheckpointError
    from fastinstructor.ray import serving
    from fastinstructor.server.settings import ServerSettings, resolve

    deleted = []
    monkeypatch.setattr(serve, "delete", deleted.append)
    monkeypatch.setattr(serving.ray, "shutdown", lambda: None)  # the module's cluster serves the other tests
    values = resolve({"model": "/no/such/model", "engine": "ray"})
    with pytest.raises(CheckpointError, match="no such folder"):
        serving.serve_from_values(values, ServerSettings())
    assert not deleted


def test_a_second_serve_command_refuses_to_replace_the_application_running(cluster, tiny_model, monkeypatch):
    """`serve --engine ray` on a cluster where a fastinstructor application already runs: refused, naming the way
    out, and the running one stays (serve.run under the same name would have replaced it)."""
    from types import SimpleNamespace

    from ray import serve

    from fastinstructor.ray import serving
    from fastinstructor.server.settings import ServerSettings, resolve

    deployed, deleted = [], []
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications={"fastinstructor": "RUNNING"}))

    def run_server(*args, **kwargs):  # a deployment over the running one: fail here rather than serve for ever
        deployed.append(args)
        raise RuntimeError("deployed over the running application")

    monkeypatch.setattr(serving, "run_server", run_server)
    monkeypatch.setattr(serve, "delete", deleted.append)
    monkeypatch.setattr(serving.ray, "shutdown", lambda: None)  # the module's cluster serves the other tests
    values = resolve({"model": str(tiny_model), "engine": "ray"})
    with pytest.raises(ValueError, match="already runs on this cluster.*stop that one"):
        serving.serve_from_values(values, ServerSettings())
    assert not deployed and not deleted


def test_a_shipped_folder_is_checked_against_its_key(shipped, tiny_model, tmp_path, monkeypatch):
    """The key is the sha256 of each file's relative name, a NUL and its bytes, in order; a copy that does not hash
    to it is refused and leaves nothing in the cache."""
    digest = hashlib.sha256()
    for file in fray.shipping._files(tiny_model):
        digest.update(f"{file.relative_to(tiny_model).as_posix()}\0".encode() + file.read_bytes())
    assert shipped.key == digest.hexdigest()
    monkeypatch.setenv("FASTINSTRUCTOR_CACHE", str(tmp_path))
    with pytest.raises(OSError, match=f"the shipped copy of {tiny_model.name} does not match its sha256"):
        dataclasses.replace(shipped, key="0" * 64).path()
    assert not [p for p in (tmp_path / "ray").iterdir() if not p.name.endswith(".lock")]


@pytest.mark.parametrize("batch_format", ["pyarrow", "pandas", "numpy"])
def test_map_batches_in_two_actors_equals_encode(shipped, model, real_texts, batch_format):
    rows = [{"id": i, "text": t, "task": f"Represent the text {i % 3}:"} for i, t in enumerate(real_texts[:24])]
    out = (
        ray.data.from_items(rows, override_num_blocks=4)
        .map_batches(
            fray.Embedder,
            fn_constructor_args=(shipped,),
            fn_constructor_kwargs={"instruction_column": "task"},
            concurrency=2,
            num_cpus=1,
            batch_size=5,
            batch_format=batch_format,
        )
        .take_all()
    )
    got = {row["id"]: np.asarray(row["embedding"], dtype=np.float32) for row in out}
    assert sorted(got) == list(range(len(rows)))
    expected = model.encode([[r["task"], r["text"]] for r in rows])
    np.testing.assert_allclose(np.stack([got[i] for i in range(len(rows))]), expected, atol=1e-6)


def test_the_embedder_names_a_null_text_and_refuses_an_instruction_that_fills_the_length(tiny_model):
    import pyarrow as pa

    with pytest.raises(TypeError, match=r"column 'text', row 1 of this batch, is None, not a text"):
        fray.Embedder(tiny_model, instruction=DOC)(pa.table({"text": ["a", None]}))
    with pytest.raises(TypeError, match=r"column 'task', row 0 of this batch, is nan"):
        fray.Embedder(tiny_model, instruction_column="task")({"text": np.array(["a"]), "task": np.array([np.nan])})
    with pytest.raises(ValueError, match="the instruction takes all 512 tokens"):
        fray.Embedder(tiny_model, instruction="Represent " + " ".join(f"w{i}" for i in range(600)))


def test_the_embedder_takes_one_instruction_or_none(tiny_model, model, real_texts):
    import pyarrow as pa

    texts = real_texts[:3]
    one = fray.Embedder(tiny_model, instruction=DOC)(pa.table({"text": texts}))
    np.testing.assert_allclose(np.array(one.column("embedding").to_pylist()), model.encode([[DOC, t] for t in texts]))
    plain = fray.Embedder(tiny_model, output_column="v")({"text": np.array(texts, dtype=object)})
    np.testing.assert_allclose(plain["v"], model.encode(texts), atol=1e-6)
    assert fray.Embedder(tiny_model)({"text": np.array([], dtype=object)})["embedding"].shape == (0, model.dim)
    with pytest.raises(ValueError, match="either instruction"):
        fray.Embedder(tiny_model, instruction=DOC, instruction_column="task")


def test_an_actor_takes_the_threads_ray_assigned_it(cluster, tiny_model):
    @ray.remote(num_cpus=2)
    class Probe:
        def threads(self):
            import torch

            fray.load_on_worker(tiny_model)
            return fray.actor_threads(), torch.get_num_threads()

    probe = Probe.remote()
    assert ray.get(probe.threads.remote()) == (2, 2)
    ray.kill(probe)


@pytest.fixture(scope="module")
def serve_port(cluster) -> int:
    """Ray Serve's HTTP proxy listens on one port per cluster: every Serve test here uses it."""
    pytest.importorskip("httpx", reason="the server tests need httpx")
    pytest.importorskip("starlette", reason="the server extra is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_readme_ray_serve_snippet_answers_like_encode(tiny_model, model, real_texts, serve_port):
    """The README's Python Ray Serve snippet (one replica of half a CPU here): ``/v1/embeddings`` equals ``encode``,
    with the request limits, the served name and the metrics of the local server."""
    import httpx
    from ray import serve

    code = _replaced(
        _readme_snippets()[4][1],
        {
            '"hkunlp/instructor-large"': repr(str(tiny_model)),
            "port=8000": f"port={serve_port}",
            "replicas=2": "replicas=1",
            "num_cpus=4": "num_cpus=0.5",
            "max_inputs=256": "max_inputs=8",
        },
    )
    scope: dict = {}
    exec(compile(code, "README:serve", "exec"), scope)
    url = scope["url"]
    try:
        texts = real_texts[:4]
        reply = httpx.post(url + "/v1/embeddings", json={"input": texts, "model": "tiny"}, timeout=60)
        assert reply.status_code == 200, reply.text
        got = np.array([d["embedding"] for d in reply.json()["data"]])
        np.testing.assert_allclose(got, model.encode([[README_DOC, t] for t in texts]), atol=1e-6)
        too_many = httpx.post(url + "/v1/embeddings", json={"input": ["a"] * 9}, timeout=60)
        assert too_many.status_code == 413 and "limit of 8" in too_many.json()["error"]["message"]
        assert httpx.get(url + "/v1/models", timeout=60).json()["data"][0]["id"] == "tiny"
        assert "fastinstructor_inputs_total 4.0" in httpx.get(url + "/metrics", timeout=60).text
        assert httpx.get(url + "/ready", timeout=60).json()["status"] == "ready"
    finally:
        serve.delete(fray.DEPLOYMENT)


def test_the_readme_serve_engine_ray_command(tiny_model, model, real_texts, serve_port):
    """The README's ``fastinstructor serve --engine ray --address ...`` (autoscaling 1 to 2 replicas of half a CPU
    here) deploys onto the running cluster; Ctrl-C removes the deployment."""
    import httpx

    address = ray.get_runtime_context().gcs_address
    argv = _argv(
        _readme_snippets()[3][1],
        {
            "auto": address,
            "hkunlp/instructor-large": str(tiny_model),
            "8000": str(serve_port),
            "--replicas 2": "--replicas 1",
            "--max-replicas 8": "--max-replicas 2",
            "--replica-cpus 4": "--replica-cpus 0.5",
        },
    )
    environment = {**os.environ, "FASTINSTRUCTOR_SERVED_MODEL_NAME": "tiny-ray"}
    command = [sys.executable, "-m", "fastinstructor", *argv, "--max-inputs", "4"]
    # The Ctrl-C below reaches the command only if it does not inherit an ignored SIGINT, as every command of a
    # shell run in the background (`pytest &`, nohup) does: the test's process gives it the default instead.
    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(command, env=environment, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    url, deadline = f"http://127.0.0.1:{serve_port}", time.monotonic() + 180
    try:
        while True:
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the deployment did not answer in 180 s"
            try:
                if httpx.get(url + "/v1/models", timeout=5).json()["data"][0]["id"] == "tiny-ray":
                    break
            except (httpx.TransportError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        while "serving 'tiny-ray' on" not in process.stderr.readline():  # the command saw every replica start
            assert process.poll() is None
        texts = real_texts[:4]
        reply = httpx.post(url + "/v1/embeddings", json={"input": texts}, timeout=60).json()
        np.testing.assert_allclose(np.array([d["embedding"] for d in reply["data"]]), model.encode(texts), atol=1e-6)
        assert httpx.post(url + "/v1/embeddings", json={"input": ["a"] * 5}, timeout=60).status_code == 413
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 130
    from ray import serve

    assert fray.DEPLOYMENT not in serve.status().applications


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, real_texts) -> str:
    """1,000 evidence sentences of the shared data (or the test texts, repeated) in two JSON Lines files: a glob."""
    from fastinstructor.data import shared_data_dir

    folder = tmp_path_factory.mktemp("corpus")
    data = shared_data_dir()
    if data is not None:
        lines = (data / "climate_fever_evidence.jsonl").read_text(encoding="utf-8").splitlines()[:1000]
    else:
        lines = [json.dumps({"id": f"r{i}", "text": f"{real_texts[i % len(real_texts)]} ({i})"}) for i in range(1000)]
    (folder / "a.jsonl").write_text("\n".join(lines[:500]) + "\n", encoding="utf-8")
    (folder / "b.jsonl").write_text("\n".join(lines[500:]) + "\n", encoding="utf-8")
    return str(folder / "*.jsonl")


JOB = {"instruction": DOC, "shard_rows": 10}


@pytest.fixture(scope="module")
def local_output(corpus, tiny_model, tmp_path_factory):
    """The local job's output on the same input: what the Ray job must equal."""
    output = tmp_path_factory.mktemp("local") / "out"
    fastinstructor.embed_corpus(tiny_model, corpus, output, quiet=True, **JOB)
    return fastinstructor.read_embeddings(output)


def _assert_equal_to_local(output, local_output) -> None:
    ids, vectors = fastinstructor.read_embeddings(output)
    assert ids == local_output[0] and len(set(ids)) == len(ids) == 1000  # complete, unique, input order
    assert np.abs(vectors - local_output[1]).max() <= 1e-6


def test_embed_dataset_equals_the_local_job(shipped, corpus, local_output, tmp_path):
    summary = fray.embed_dataset(shipped, corpus, tmp_path / "out", parts=3, actors=2, **JOB)
    assert summary["totals"]["rows"] == 1000 and summary["parts"] == 3 and len(summary["shards"]) == 100
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"part-{k}-of-3" for k in range(3)]
    _assert_equal_to_local(tmp_path / "out", local_output)
    again = fray.embed_dataset(shipped, corpus, tmp_path / "out", **JOB)  # no parts: the folder's 3, not the cluster's
    assert again["parts"] == 3 and again["totals"]["rows"] == 1000


def test_embed_dataset_takes_its_input_options_by_name(shipped, tmp_path):
    """Any of input_format, text_field, id_field, instruction_field may be left out (they went by position)."""
    folder = tmp_path / "in"
    folder.mkdir()
    rows = [{"doc": f"d{i}", "body": f"Sea ice report {i}."} for i in range(4)]
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fray.embed_dataset(shipped, folder, tmp_path / "out", parts=1, text_field="body", id_field="doc", **JOB)
    assert fastinstructor.read_embeddings(tmp_path / "out")[0] == ["d0", "d1", "d2", "d3"]


def test_a_model_that_does_not_load_on_a_worker_fails_the_job_at_once_naming_why(shipped, corpus, tmp_path):
    """An actor whose model does not load (a bad load option) is not replaced by another that would fail the same
    way, and the error names the cause, not "run the same job again"."""
    with pytest.raises(ValueError, match=r"the model did not load on a Ray worker \(.*int3"):
        fray.embed_dataset(shipped, corpus, tmp_path / "out", parts=2, actors=2, load_options={"precision": "int3"})


@pytest.mark.parametrize("max_retries", [0, 1])
def test_an_actor_killed_mid_run_loses_and_duplicates_nothing(shipped, corpus, local_output, tmp_path, max_retries):
    """Killed with no retry left: the job fails, keeping every finished shard, and a re-run embeds the rest; with a
    retry: a new actor resumes the part within the same call. Either way the output equals the local job's."""
    from concurrent.futures import ThreadPoolExecutor

    output, options = tmp_path / "out", {"parts": 2, "actors": 2, **JOB}
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(fray.embed_dataset, shipped, corpus, output, max_retries=max_retries, **options)
        manifest = output / "part-0-of-2" / "manifest.json"
        while True:  # part 0 has written a few shards and is not done: kill the actor running it
            assert not job.done(), job.exception()
            try:
                state = json.loads(manifest.read_text())
            except (OSError, ValueError):
                state = {"shards": []}
            if len(state["shards"]) >= 3:
                assert not state["complete"], "the job finished before the test could kill an actor"
                break
            time.sleep(0.005)
        first = next(n for n in ray.util.list_named_actors() if n.startswith("fastinstructor-embed-"))
        ray.kill(ray.get_actor(first.rpartition("-")[0] + "-0"))  # the first actor: it took part 0
        if max_retries:
            summary = job.result(timeout=300)
        else:
            with pytest.raises(fastinstructor.CorpusError, match="1 of 2 part"):
                job.result(timeout=300)
            killed = json.loads(manifest.read_text())
            assert not killed["complete"] and 3 <= len(killed["shards"]) < 50
            assert json.loads((output / "part-1-of-2" / "manifest.json").read_text())["complete"]
            summary = fray.embed_dataset(shipped, corpus, output, **options)
    assert summary["totals"]["rows"] == 1000 and len(summary["shards"]) == 100
    _assert_equal_to_local(output, local_output)


@pytest.fixture
def readme_folder(corpus, tmp_path, monkeypatch) -> Path:
    """A working folder with the README's ``corpus/`` (the test corpus's two files)."""
    (tmp_path / "corpus").mkdir()
    for file in Path(corpus).parent.glob("*.jsonl"):
        (tmp_path / "corpus" / file.name).write_bytes(file.read_bytes())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _expected(model, corpus) -> tuple[list[str], np.ndarray]:
    rows = [json.loads(line) for file in sorted(Path(corpus).parent.glob("*.jsonl")) for line in file.open()]
    return [r["id"] for r in rows], model.encode([[README_DOC, r["text"]] for r in rows])


def test_the_readme_ray_data_snippet(readme_folder, tiny_model, model, corpus):
    import pyarrow.parquet as pq

    replacements = {
        "ray.init()": "ray.init(ignore_reinit_error=True)",
        '"hkunlp/instructor-large"': repr(str(tiny_model)),
        "num_cpus=1": "num_cpus=0.5",  # two actors of 1 CPU would leave the 2-CPU cluster none to read with
        "/data/": f"{readme_folder}/",
    }
    exec(compile(_replaced(_readme_snippets()[0][1], replacements), "README:ray-data", "exec"), {})
    table = pq.read_table(readme_folder / "embedded")
    got = dict(zip(table.column("id").to_pylist(), np.array(table.column("embedding").to_pylist()), strict=True))
    ids, expected = _expected(model, corpus)
    assert sorted(got) == sorted(ids) and len(got) == len(ids)
    np.testing.assert_allclose(np.stack([got[i] for i in ids]), expected, atol=1e-6)


def test_the_readme_embed_engine_ray_command_and_python(readme_folder, tiny_model, model, corpus, capsys):
    """The README's ``fastinstructor embed --engine ray --address ...`` (2 parts of 10-row shards here), then its
    Python form into the same folder: every part is complete, nothing is embedded again, and the output reads back
    in input order."""
    from fastinstructor.cli import main

    address = ray.get_runtime_context().gcs_address
    snippets, model_path = _readme_snippets(), str(tiny_model)
    sizes = {"--shard-rows 10000": "--shard-rows 10", "--num-shards 8": "--num-shards 2", "--threads 4": "--threads 1"}
    argv = _argv(snippets[1][1], {"auto": address, "hkunlp/instructor-large": model_path, **sizes})
    assert main(argv) == 0
    assert "embedded 1000 rows" in capsys.readouterr().out
    sizes = {"parts=8": "parts=2", "num_cpus=4": "num_cpus=1", "shard_rows=10000": "shard_rows=10"}
    code = _replaced(snippets[2][1], {'"hkunlp/instructor-large"': repr(model_path), **sizes})
    scope: dict = {}
    exec(compile(code, "README:embed_dataset", "exec"), scope)
    ids, expected = _expected(model, corpus)
    assert scope["ids"] == ids
    np.testing.assert_allclose(scope["embeddings"], expected, atol=1e-6)
    manifests = [json.loads((readme_folder / "out" / f"part-{k}-of-2" / "manifest.json").read_text()) for k in (0, 1)]
    assert [len(m["shards"]) for m in manifests] == [50, 50]
    assert main([*argv, "--shard-index", "1"]) == 2
    assert "not --shard-index" in capsys.readouterr().err


def test_ray_is_imported_only_in_fastinstructor_ray():
    """Ray is an extra: no other module imports it, so the package, its command line and its server work without."""
    import ast

    package = Path(fastinstructor.__file__).parent
    found = []
    for path in package.rglob("*.py"):
        if path.relative_to(package).parts[0] == "ray":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            found += [f"{path.relative_to(package)}: {n}" for n in names if n == "ray" or n.startswith("ray.")]
    assert not found, found
