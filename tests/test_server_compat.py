"""The server as a drop-in for OpenAI and text-embeddings-inference (TEI) deployments (issue 17): named and default
instructions, the official clients, truncation_direction, /tokenize, /v1/models, schemas and /openapi.json,
configuration by environment, /health against /ready, and the request-duration histogram. Real servers on
loopback ports, as in test_server.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from test_server import _free_port, _start, _threaded_server

httpx = pytest.importorskip("httpx", reason="the server tests need httpx (pip install '.[dev]')")
pytest.importorskip("pydantic", reason="the server extra is not installed (pip install '.[server]')")

QUERY = "Represent the climate question for retrieving supporting documents:"
DOC = "Represent the Wikipedia document for retrieval:"
NAME = "instructor-test"
KEYS = {"message", "type", "param", "code"}


def _cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _assert_same(got, expected) -> None:
    cosines = _cosines(got, expected)
    assert cosines.min() >= 0.99999, cosines


@pytest.fixture(scope="module")
def named(tiny_model):
    """A server with two named instructions, 'doc' the default, and a served name."""
    options = ["--instruction", f"query={QUERY}", "--instruction", f"doc={DOC}", "--default-instruction", "doc"]
    process, url = _start(tiny_model, *options, "--served-model-name", NAME)
    yield url
    process.terminate()
    process.wait(timeout=60)


@pytest.fixture(scope="module")
def model(tiny_model):
    import fastinstructor

    return fastinstructor.load(tiny_model)


def _error(reply, status: int) -> dict:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == KEYS and error["code"] == status and error["message"], error
    return error


def test_the_official_openai_client_without_extra_body_gets_the_default_instruction(named, model, real_texts):
    openai = pytest.importorskip("openai", reason="the openai client is not installed")
    client = openai.OpenAI(base_url=named + "/v1", api_key="unused")
    texts = real_texts[:4]
    reply = client.embeddings.create(model=NAME, input=texts)  # as LangChain's or LlamaIndex's client sends it
    got = [d.embedding for d in reply.data]
    _assert_same(got, model.encode([[DOC, t] for t in texts]))
    assert _cosines(got, model.encode(texts)).min() < 0.9999  # not what pooling with no instruction gives
    assert reply.model == NAME
    query = client.embeddings.create(model=NAME, input=texts, extra_body={"prompt_name": "query"})
    _assert_same([d.embedding for d in query.data], model.encode([[QUERY, t] for t in texts]))
    with pytest.raises(openai.NotFoundError) as wrong:
        client.embeddings.create(model="text-embedding-3-small", input=texts)
    assert "text-embedding-3-small" in str(wrong.value) and NAME in str(wrong.value)
    assert [m.id for m in client.models.list()] == [NAME]


def test_prompt_name_on_the_tei_api_and_the_tei_client(named, model, real_texts):
    texts = real_texts[:3]
    reply = httpx.post(named + "/embed", json={"inputs": texts, "prompt_name": "query"})
    assert reply.status_code == 200, reply.text
    _assert_same(reply.json(), model.encode([[QUERY, t] for t in texts]))
    default = httpx.post(named + "/embed", json={"inputs": texts})
    _assert_same(default.json(), model.encode([[DOC, t] for t in texts]))
    none = httpx.post(named + "/embed", json={"inputs": texts, "instruction": ""})  # '': no instruction at all
    _assert_same(none.json(), model.encode([["", t] for t in texts]))
    hub = pytest.importorskip("huggingface_hub", reason="huggingface_hub (TEI's Python client) is not installed")
    client = hub.InferenceClient(model=named)  # posts to the root route, as to a TEI deployment
    _assert_same(client.feature_extraction(texts[0], prompt_name="query"), model.encode([[QUERY, texts[0]]]))


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("/embed", {"inputs": "a", "prompt_name": "nope"}, 400, "unknown prompt_name 'nope': the known names are"),
        ("/v1/embeddings", {"input": "a", "prompt_name": "nope"}, 400, "['doc', 'query']"),
        ("/tokenize", {"inputs": "a", "prompt_name": "nope"}, 400, "unknown prompt_name"),
        ("/embed", {"inputs": "a", "prompt_name": "doc", "instruction": "x"}, 400, "not both"),
        ("/v1/embeddings", {"input": "a", "colour": "red"}, 422, "unknown field 'colour' (accepted: input, model"),
        ("/embed", {"inputs": "a", "pooling": "cls"}, 422, "unknown field 'pooling'"),
        ("/tokenize", {"inputs": "a", "truncate": True}, 422, "unknown field 'truncate'"),
        ("/v1/embeddings", {"input": 42}, 422, "'input' must be a text, or a non-empty list of texts, got a number"),
        ("/v1/embeddings", {"input": ["a", 3]}, 422, "got a list whose item 1 is a number"),
        ("/v1/embeddings", {"input": [[1, 2]]}, 422, "token ids are not accepted"),
        ("/v1/embeddings", {"model": NAME}, 422, "'input' is required"),
        ("/v1/embeddings", {"input": "a", "encoding_format": "hex"}, 422, "'encoding_format' must be 'float' or"),
        ("/v1/embeddings", {"input": "a", "prompt_name": 1}, 422, "'prompt_name' must be the name of one"),
        ("/embed", {"inputs": "a", "truncate": "yes"}, 422, "'truncate' must be true or false"),
        ("/embed", {"inputs": "a", "truncation_direction": "Up"}, 422, "'truncation_direction' must be 'Right'"),
        ("/v1/embeddings", {"input": "a", "model": "gpt-4"}, 404, "'gpt-4' does not exist here"),
    ],
)
def test_unknown_names_fields_and_wrong_types_are_4xx_in_openais_error_shape(named, path, body, status, message):
    error = _error(httpx.post(named + path, json=body), status)
    assert message in error["message"], error
    if status == 422:  # the field at fault
        assert error["param"] in {*body, "input"} and error["param"] in error["message"], error


def _left_truncated(model, instruction: str, words: list[str]) -> str:
    """The longest end of the text, starting at a word, that fits with the instruction (binary search)."""
    low, high = 0, len(words)
    while low < high:
        middle = (low + high) // 2
        if model.tokenizer([[instruction, " ".join(words[middle:])]]).truncated[0]:
            low = middle + 1
        else:
            high = middle
    return " ".join(words[low:])


def test_truncation_direction_left_keeps_the_end_of_the_text(named, model):
    words = [f"word{i}" for i in range(1500)]
    text = " ".join(words)
    tail = _left_truncated(model, DOC, words)
    assert 10 < len(tail.split()) < 1500 and tail.endswith("word1499")
    left = httpx.post(named + "/embed", json={"inputs": [text], "truncate": True, "truncation_direction": "Left"})
    assert left.status_code == 200, left.text
    _assert_same(left.json(), model.encode([[DOC, tail]]))
    right = httpx.post(named + "/embed", json={"inputs": [text], "truncate": True, "truncation_direction": "right"})
    _assert_same(right.json(), model.encode([[DOC, text]]))
    assert _cosines(left.json(), right.json())[0] < 0.9999
    refused = httpx.post(named + "/embed", json={"inputs": [text], "truncation_direction": "Left"})
    _error(refused, 413)  # TEI's rule: without truncate=true an over-long input is refused
    short = httpx.post(
        named + "/embed", json={"inputs": ["a short text"], "truncate": True, "truncation_direction": "Left"}
    )
    _assert_same(short.json(), model.encode([[DOC, "a short text"]]))
    tokens = httpx.post(named + "/tokenize", json={"inputs": text, "truncation_direction": "Left"}).json()[0]
    assert [t["id"] for t in tokens] == model.tokenizer([[DOC, tail]]).ids[0]


def test_tokenize_gives_the_tokenizers_ids_with_offsets_and_the_instruction_marked(named, model, real_texts):
    texts = [real_texts[0], "warming " * 700]
    reply = httpx.post(named + "/tokenize", json={"inputs": texts, "prompt_name": "query"})
    assert reply.status_code == 200, reply.text
    expected = model.tokenizer([[QUERY, t] for t in texts])
    for tokens, ids, start, text in zip(reply.json(), expected.ids, expected.pool_start, texts, strict=True):
        assert [t["id"] for t in tokens] == ids
        assert tokens[-1] == {"id": 1, "text": "</s>", "special": True, "start": None, "stop": None,
                              "instruction": False, "pooled": True}  # fmt: skip
        joined = (QUERY + text.strip()).strip()
        pieces = model.tokenizer.tokenizer.convert_ids_to_tokens(ids[:-1])
        for token, piece in zip(tokens[:-1], pieces, strict=True):
            assert token["text"] == joined[token["start"] : token["stop"]]
            assert token["text"] in piece.replace("\u2581", " ") or piece.startswith("\u2581"), (token, piece)
        assert [t["pooled"] for t in tokens] == [i >= start for i in range(len(ids))]
        marked = [t["instruction"] for t in tokens]
        assert marked == sorted(marked, reverse=True) and 0 < sum(marked) <= start + 1  # a prefix: the instruction
    bare = httpx.post(named + "/tokenize", json={"inputs": "a text", "add_special_tokens": False}).json()[0]
    assert [t["id"] for t in bare] == model.tokenizer([[DOC, "a text"]]).ids[0][:-1]


def test_models_and_every_response_name_the_served_model_never_a_path(named, tiny_model):
    models = httpx.get(named + "/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [NAME]
    assert httpx.get(named + f"/v1/models/{NAME}").json()["id"] == NAME
    _error(httpx.get(named + "/v1/models/other"), 404)
    replies = [
        httpx.get(named + "/v1/models"),
        httpx.get(named + "/info"),
        httpx.post(named + "/v1/embeddings", json={"input": "a"}),
        httpx.post(named + "/v1/embeddings", json={"input": "a", "model": NAME}),
    ]
    for reply in replies:
        assert str(tiny_model) not in reply.text and str(tiny_model.parent) not in reply.text
    assert replies[2].json()["model"] == NAME and replies[3].json()["model"] == NAME
    info = replies[1].json()
    assert info["model_id"] == NAME and info["prompts"] == {"query": QUERY, "doc": DOC}
    assert info["default_prompt_name"] == "doc" and info["default_prompt"] == DOC


def test_responses_match_their_declared_schemas(named):
    from fastinstructor.server import schemas

    embeddings = schemas.EmbeddingsResponse
    checks = [
        (httpx.post(named + "/v1/embeddings", json={"input": ["a", "b"]}), embeddings),
        (httpx.post(named + "/v1/embeddings", json={"input": "a", "encoding_format": "base64"}), embeddings),
        (httpx.post(named + "/embed", json={"inputs": ["a"]}), schemas.EmbedResponse),
        (httpx.post(named + "/tokenize", json={"inputs": ["a b"]}), schemas.TokenizeResponse),
        (httpx.get(named + "/v1/models"), schemas.ModelList),
        (httpx.get(named + "/info"), schemas.Info),
        (httpx.get(named + "/ready"), schemas.Status),
        (httpx.post(named + "/embed", json={"inputs": 1}), schemas.ErrorResponse),
    ]  # fmt: skip
    for reply, schema in checks:
        schema.model_validate(reply.json(), strict=False)
        if schema is not schemas.ErrorResponse:
            assert reply.status_code == 200, reply.text
    info = httpx.get(named + "/info").json()
    assert set(info) == set(schemas.Info.model_fields), set(info) ^ set(schemas.Info.model_fields)


def test_openapi_json_is_a_valid_document_that_lists_every_route(named, model):
    validator = pytest.importorskip(
        "openapi_spec_validator", reason="openapi-spec-validator (the dev extra) is missing"
    )
    from fastinstructor.server import ServerSettings, create_app

    document = httpx.get(named + "/openapi.json").json()
    validator.validate(document)
    app = create_app(model, ServerSettings())
    # {model:path}: a served name may hold a '/' (a hub id); OpenAPI writes the parameter as {model}
    served = {
        (route.path.replace(":path}", "}"), method.lower())
        for route in app.routes
        for method in route.methods - {"HEAD"}
    }
    listed = {(path, method) for path, operations in document["paths"].items() for method in operations}
    assert served == listed, served ^ listed
    schema = document["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    request = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    assert request["additionalProperties"] is False and {"input", "prompt_name", "instruction"} <= set(
        request["properties"]
    )


def test_an_environment_only_configuration_starts_the_server_with_its_settings(tiny_model, model):
    port = _free_port()
    environment = {
        **os.environ,
        "FASTINSTRUCTOR_MODEL": str(tiny_model),
        "FASTINSTRUCTOR_PORT": str(port),
        "FASTINSTRUCTOR_INSTRUCTION": json.dumps([f"query={QUERY}", f"doc={DOC}"]),
        "FASTINSTRUCTOR_DEFAULT_INSTRUCTION": "query",
        "FASTINSTRUCTOR_SERVED_MODEL_NAME": "from-env",
        "FASTINSTRUCTOR_MAX_INPUTS": "3",
        "FASTINSTRUCTOR_MAX_BATCH_ROWS": "7",
        "FASTINSTRUCTOR_API_KEY": "k1",
        "FASTINSTRUCTOR_METRICS_WITHOUT_KEY": "true",
        "FASTINSTRUCTOR_MAX_SEQ_LENGTH": "48",
    }
    command = [sys.executable, "-m", "fastinstructor", "serve", "--max-batch-rows", "5"]  # a flag wins
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url, key = f"http://127.0.0.1:{port}", {"Authorization": "Bearer k1"}
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "the server did not become ready"
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        info = httpx.get(url + "/info", headers=key).json()
        assert info["model_id"] == "from-env" and info["prompts"] == {"query": QUERY, "doc": DOC}
        assert info["max_client_batch_size"] == 3 and info["max_batch_requests"] == 5
        assert info["limits"]["metrics_without_key"] is True and info["max_input_length"] == 48
        assert httpx.get(url + "/info").status_code == 401
        reply = httpx.post(url + "/embed", json={"inputs": ["a text"]}, headers=key)
        _assert_same(reply.json(), model.encode([[QUERY, "a text"]]))
        _error(httpx.post(url + "/embed", json={"inputs": ["a"] * 4}, headers=key), 413)
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_environment_values_are_converted_and_checked_like_flags(tiny_model):
    from fastinstructor.server.settings import resolve, settings_from

    model = {"FASTINSTRUCTOR_MODEL": "m"}
    values = resolve({}, {**model, "FASTINSTRUCTOR_MAX_WAIT_MS": "2.5", "FASTINSTRUCTOR_CORS_ORIGIN": "https://a"})
    assert values["max_wait_ms"] == 2.5 and values["cors_origin"] == ["https://a"] and values["port"] == 8080
    assert resolve({"port": 9}, {**model, "FASTINSTRUCTOR_PORT": "10"})["port"] == 9
    assert resolve({}, {**model, "FASTINSTRUCTOR_API_KEYS": "a,b"})["api_key"] == ["a", "b"]  # the older form
    assert resolve({}, {**model, "FASTINSTRUCTOR_PRECISION": "bf16"})["precision"] == "bfloat16"
    for name, value, message in [
        ("FASTINSTRUCTOR_PORT", "eighty", "FASTINSTRUCTOR_PORT='eighty' is not a valid value for --port"),
        ("FASTINSTRUCTOR_METRICS_WITHOUT_KEY", "maybe", "expected true or false"),
        ("FASTINSTRUCTOR_INSTRUCTION", '["a=b", 3]', "a JSON list of strings"),
        ("FASTINSTRUCTOR_PRECISION", "int4", "unknown precision 'int4'"),
        ("FASTINSTRUCTOR_BACKEND", "gpu", "unknown backend 'gpu'; choose one of: auto, reference"),
    ]:
        with pytest.raises(ValueError) as err:
            resolve({}, {**model, name: value})
        assert message in str(err.value), str(err.value)
    with pytest.raises(ValueError, match="pass --model .* or set FASTINSTRUCTOR_MODEL"):
        resolve({}, {})
    with pytest.raises(ValueError, match="'qeury' is no instruction name"):
        named = {"FASTINSTRUCTOR_INSTRUCTION": "query=Q", "FASTINSTRUCTOR_DEFAULT_INSTRUCTION": "qeury"}
        settings_from(resolve({}, {**model, **named}))
    with pytest.raises(ValueError, match="expects NAME=TEXT"):
        settings_from(resolve({"instruction": ["Represent the text:"]}, model))
    help_text = subprocess.run(
        [sys.executable, "-m", "fastinstructor", "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "[env: FASTINSTRUCTOR_MAX_INPUTS]" in " ".join(help_text.split())
    assert "a flag given on the command line wins over its variable" in " ".join(help_text.split())


def test_health_is_liveness_and_ready_is_readiness(tiny_model, model):
    """/ready answers 503 while the queue is at its limit (a probe takes the replica out of rotation), /health
    stays 200; both are back once the queue drains."""
    with _threaded_server(tiny_model, delay_s=1.0, max_batch_rows=1, max_queued_rows=2) as (url, server, _):
        ready = httpx.get(url + "/ready").json()
        assert ready["status"] == "ready" and ready["checks"]["parity"] in ("passed", "reference")
        batcher = server.config.app.state.batcher
        with ThreadPoolExecutor(max_workers=3) as pool:
            replies = [
                pool.submit(httpx.post, url + "/embed", json={"inputs": [f"t{i}"]}, timeout=60) for i in range(3)
            ]
            deadline = time.monotonic() + 30
            while len(batcher.pending) < 2:
                assert time.monotonic() < deadline, "the requests never queued"
                time.sleep(0.01)
            error = _error(httpx.get(url + "/ready"), 503)
            assert "queue 2 of 2 rows" in error["message"]
            assert httpx.get(url + "/health").status_code == 200
            assert all(r.result().status_code == 200 for r in replies)
        assert httpx.get(url + "/ready").status_code == 200


def test_metrics_have_the_request_duration_histogram_and_the_process_collectors(named):
    def metrics() -> dict[str, float]:
        lines = httpx.get(named + "/metrics").text.splitlines()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if not line.startswith("#")}

    count = 'fastinstructor_request_duration_seconds_count{endpoint="/embed"}'
    before = metrics().get(count, 0.0)
    for _ in range(3):
        httpx.post(named + "/embed", json={"inputs": ["a"]})
    httpx.post(named + "/embed", json={"inputs": 1})  # errors are timed too
    after = metrics()
    assert after[count] - before == 4
    assert after['fastinstructor_request_duration_seconds_bucket{endpoint="/embed",le="+Inf"}'] == after[count]
    assert after["process_resident_memory_bytes"] > 0 and after["process_open_fds"] > 0
    assert any(name.startswith("python_info") for name in after)


def test_bodies_python_cannot_read_methods_and_instructions_that_crowd_out_the_text_are_4xx(named, model):
    big = b'{"input": "a", "dimensions": 1' + b"0" * 5000 + b"}"  # an int past Python's 4,300 digits
    _error(httpx.post(named + "/v1/embeddings", content=big, headers={"Content-Type": "application/json"}), 400)
    surrogate_key = b'{"input": "a", "\\ud800": 1}'  # valid JSON; a field name that is no text
    error = _error(
        httpx.post(named + "/v1/embeddings", content=surrogate_key, headers={"Content-Type": "application/json"}), 422
    )
    assert "field name that is not valid text" in error["message"] and error["param"] is None
    wrong_method = httpx.get(named + "/v1/embeddings")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    long = "Represent " + " ".join(f"w{i}" for i in range(600)) + ":"
    for path, body in (
        ("/v1/embeddings", {"input": ["hello", "cats"], "instruction": long}),
        ("/embed", {"inputs": "hello", "instruction": long, "truncate": True}),
    ):
        error = _error(httpx.post(named + path, json=body), 400)
        assert "its instruction takes all of the model's 512 tokens" in error["message"], error


def test_a_served_name_with_a_slash_is_a_model_card_path(model):
    """A hub id, the default served name, holds a '/': GET /v1/models/{id} must still find it."""
    from starlette.testclient import TestClient

    from fastinstructor.server import ServerSettings, create_app

    with TestClient(create_app(model, ServerSettings(), model_name="hkunlp/instructor-large")) as client:
        assert client.get("/v1/models/hkunlp/instructor-large").json()["id"] == "hkunlp/instructor-large"
        assert client.get("/v1/models/hkunlp/other").status_code == 404


def test_one_tokenizer_called_from_two_threads_keeps_each_calls_truncation(model):
    """The server tokenizes on two threads. A fast tokenizer sets its truncation on the shared Rust tokenizer before
    each call: unguarded, a window (no truncation) tokenized while a batch (truncation) ran came back cut short."""
    tokenizer = model.tokenizer
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    texts = [" ".join(words[(i * j) % 8] for j in range(500)) for i in range(64)]
    expected = list(tokenizer.window(texts[1] * 3, 512, from_end=True).encoding["input_ids"])
    wrong = []

    def batches():
        for _ in range(100):
            tokenizer(texts)

    def windows():
        for _ in range(200):
            wrong.append(list(tokenizer.window(texts[1] * 3, 512, from_end=True).encoding["input_ids"]) != expected)

    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(batches), pool.submit(windows)]:
            future.result()
    assert not any(wrong), f"{sum(wrong)} of {len(wrong)} windows were tokenized with the other call's truncation"


def test_left_truncation_tokenizes_a_long_text_a_few_times_not_a_binary_searchs_ten(model, monkeypatch):
    """Its first guess (the text's room counted back from the end) is most often right: probed with the word
    before it, two tokenizations find the cut."""
    from fastinstructor.server.inputs import left_truncate
    from fastinstructor.tokenization import PairTokenizer

    words = [f"word{i}" for i in range(1500)]
    calls = []
    call = PairTokenizer.__call__
    monkeypatch.setattr(PairTokenizer, "__call__", lambda self, sentences: calls.append(1) or call(self, sentences))
    instruction, text = left_truncate(model.tokenizer, [DOC, " ".join(words)])
    assert instruction == DOC and text == _left_truncated(model, DOC, words)
    calls.clear()
    left_truncate(model.tokenizer, [DOC, " ".join(words)])
    assert len(calls) <= 4, f"{len(calls)} tokenizations"  # is it cut at all, the guess, the word before it (+1)


def test_the_request_timeout_covers_tokenizing_too(tiny_model):
    """A request whose tokenizing alone outlasts --request-timeout gets its 504 at the timeout, not after."""
    from starlette.testclient import TestClient

    import fastinstructor
    from fastinstructor.server import ServerSettings, create_app

    slow = fastinstructor.load(tiny_model)
    tokenizer = slow.tokenizer

    class Slow(type(tokenizer)):
        def __call__(self, sentences):
            time.sleep(1.5)
            return super().__call__(sentences)

    slow.tokenizer = Slow(tokenizer.tokenizer, tokenizer.max_length, tokenizer.pooling_rule)
    with TestClient(create_app(slow, ServerSettings(request_timeout_s=0.3))) as client:
        started = time.perf_counter()
        reply = client.post("/v1/embeddings", json={"input": ["a text"]})
        assert reply.status_code == 504 and time.perf_counter() - started < 1.2, reply.text
