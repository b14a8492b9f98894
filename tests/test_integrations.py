"""The framework adapters (fastinstructor.integrations) with the real frameworks installed: each one's query and
document vectors are ``Instructor.encode``'s with the respective instruction, retrieval round trips through each
framework's own store, and the README's "Use it with..." snippets run."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastinstructor
from fastinstructor.model import DEFAULT_DOCUMENT_INSTRUCTION, DEFAULT_QUERY_INSTRUCTION

# The frameworks must not phone home from a test (these machines have no network: a try could only stall).
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")  # chromadb
os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")

README = Path(__file__).resolve().parent.parent / "README.md"
FRAMEWORKS = {  # adapter module: (extra, the package it needs, the module that package installs)
    "langchain": ("langchain", "langchain-core", "langchain_core"),
    "llamaindex": ("llamaindex", "llama-index-core", "llama_index.core"),
    "chroma": ("chroma", "chromadb", "chromadb"),
    "haystack": ("haystack", "haystack-ai", "haystack"),
}
# langchain_community's HuggingFaceInstructEmbeddings defaults (DEFAULT_EMBED_INSTRUCTION, DEFAULT_QUERY_INSTRUCTION),
# which LlamaIndex's InstructorEmbedding also uses for INSTRUCTOR models; written out so that a change shows here.
LANGCHAIN_EMBED_INSTRUCTION = "Represent the document for retrieval: "
LANGCHAIN_QUERY_INSTRUCTION = "Represent the question for retrieving supporting documents: "
TOLERANCE = 1e-6  # max abs difference between an adapter's vector and encode's (same backend; batches may differ)


def needs(module: str):
    """The framework's module, or a skip that names the extra to install."""
    extra, package, _ = FRAMEWORKS[module]
    return pytest.importorskip(
        FRAMEWORKS[module][2], reason=f"{package} is not installed: pip install 'fastinstructor[{extra}]'"
    )


@pytest.fixture(scope="module")
def model(tiny_model):
    return fastinstructor.load(tiny_model, backend="cpu")


@pytest.fixture(scope="module")
def evidence(real_texts) -> list[str]:
    """Distinct real evidence sentences (the second half of real_texts), or the doc passages without shared data."""
    return list(dict.fromkeys(real_texts[len(real_texts) // 2 :]))


def expected(model, texts, instruction) -> np.ndarray:
    return model.encode(texts, prompt=instruction)


def assert_close(actual, wanted) -> None:
    actual = np.asarray(actual, dtype=np.float32)
    assert actual.shape == wanted.shape, (actual.shape, wanted.shape)
    worst = float(np.abs(actual - wanted).max()) if actual.size else 0.0
    assert worst <= TOLERANCE, f"max abs difference {worst:.2e} > {TOLERANCE}"


def assert_each_finds_itself(found: list[str], texts: list[str]) -> None:
    misses = [(i, hit) for i, (hit, text) in enumerate(zip(found, texts, strict=True)) if hit != text]
    assert not misses, f"{len(misses)} of {len(texts)} texts did not retrieve themselves first: {misses[:3]}"


def test_each_framework_has_its_extra_installed_by_make():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    project = tomllib.loads((README.parent / "pyproject.toml").read_text(encoding="utf-8"))
    extras = project["project"]["optional-dependencies"]
    for extra, package, _ in FRAMEWORKS.values():
        assert [re.split(r"[<>=!~\[ ]", requirement)[0] for requirement in extras[extra]] == [package], extra
    assert "fastinstructor.integrations" in project["tool"]["setuptools"]["packages"]
    (line,) = re.findall(r"^EXTRAS := (.*)$", (README.parent / "Makefile").read_text(encoding="utf-8"), flags=re.M)
    assert {extra for extra, *_ in FRAMEWORKS.values()} <= set(line.split(",")), line


def test_the_package_imports_no_framework():
    code = (
        "import fastinstructor, fastinstructor.integrations, sys; print(sorted(set(sys.modules) & set(sys.argv[1:])))"
    )
    modules = [name for *_, name in FRAMEWORKS.values()]
    done = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]


@pytest.mark.parametrize("module", sorted(FRAMEWORKS))
def test_a_missing_framework_names_its_extra(module):
    extra, package, name = FRAMEWORKS[module]
    code = f"import sys; sys.modules[{name.split('.')[0]!r}] = None\nimport fastinstructor.integrations.{module}"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and last.startswith("ImportError: fastinstructor.integrations."), done.stderr[-2000:]
    assert f"needs the {package} package" in last and f"pip install 'fastinstructor[{extra}]'" in last, last


def test_a_loaded_model_with_loading_options_is_refused(model):
    needs("langchain")
    from fastinstructor.integrations.langchain import InstructorEmbeddings

    with pytest.raises(ValueError, match="backend, device apply when the adapter loads the model"):
        InstructorEmbeddings(model, backend="cpu", device="cpu")
    with pytest.raises(TypeError, match="model must be a model id, a folder or a fastinstructor.Instructor, got int"):
        InstructorEmbeddings(42)


# LangChain ------------------------------------------------------------------------------------------------------------


def test_langchain_vectors_and_defaults(model, tiny_model, evidence):
    needs("langchain")
    from langchain_core.embeddings import Embeddings

    from fastinstructor.integrations.langchain import InstructorEmbeddings

    embeddings = InstructorEmbeddings(model)
    assert isinstance(embeddings, Embeddings)
    assert (embeddings.embed_instruction, embeddings.query_instruction) == (
        LANGCHAIN_EMBED_INSTRUCTION,
        LANGCHAIN_QUERY_INSTRUCTION,
    )
    assert_close(embeddings.embed_documents(evidence), expected(model, evidence, LANGCHAIN_EMBED_INSTRUCTION))
    assert_close(embeddings.embed_query(evidence[0]), expected(model, evidence[:1], LANGCHAIN_QUERY_INSTRUCTION)[0])
    assert_close(asyncio.run(embeddings.aembed_documents(evidence[:3])), embeddings_of(embeddings, evidence[:3]))
    assert_close(asyncio.run(embeddings.aembed_query(evidence[1])), np.array(embeddings.embed_query(evidence[1])))
    assert embeddings.embed_documents([]) == []
    custom = InstructorEmbeddings(tiny_model, embed_instruction="D:", query_instruction="Q:", backend="cpu")
    assert_close(custom.embed_documents(evidence[:4]), expected(model, evidence[:4], "D:"))
    assert_close(custom.embed_query(evidence[0]), expected(model, evidence[:1], "Q:")[0])


def test_langchain_takes_huggingface_instruct_embeddings_arguments_and_refuses_what_would_go_wrong(model, tiny_model):
    needs("langchain")
    from fastinstructor.integrations.langchain import InstructorEmbeddings

    drop_in = InstructorEmbeddings(model_name=str(tiny_model), model_kwargs={"device": "cpu"}, backend="cpu")
    assert_close(drop_in.embed_documents(["a text"]), expected(model, ["a text"], LANGCHAIN_EMBED_INSTRUCTION))
    with pytest.raises(ValueError, match=r"encode_kwargs \['convert_to_numpy', 'prompt'\]: the adapter sets these"):
        InstructorEmbeddings(model, encode_kwargs={"prompt": "x", "convert_to_numpy": False})
    with pytest.raises(ValueError, match=r"model_kwargs \['cache_folder'\]: only 'device' applies"):
        InstructorEmbeddings(model_name=str(tiny_model), model_kwargs={"cache_folder": "/tmp"})
    with pytest.raises(TypeError, match="once"):
        InstructorEmbeddings(model, model_name=str(tiny_model))
    with pytest.raises(TypeError, match="not one str"):  # list() would embed it a character at a time
        InstructorEmbeddings(model).embed_documents("a text")


def embeddings_of(embeddings, texts) -> np.ndarray:
    return np.array(embeddings.embed_documents(texts), dtype=np.float32)


def test_langchain_in_memory_vector_store_round_trip(model, evidence):
    needs("langchain")
    from langchain_core.vectorstores import InMemoryVectorStore

    from fastinstructor.integrations.langchain import InstructorEmbeddings

    store = InMemoryVectorStore.from_texts(
        evidence, InstructorEmbeddings(model), metadatas=[{"i": i} for i in range(len(evidence))]
    )
    found = [store.similarity_search(text, k=1)[0] for text in evidence]
    assert_each_finds_itself([doc.page_content for doc in found], evidence)
    assert [doc.metadata["i"] for doc in found] == list(range(len(evidence)))
    found_async = asyncio.run(store.asimilarity_search(evidence[2], k=1))
    assert found_async[0].page_content == evidence[2]


# LlamaIndex -----------------------------------------------------------------------------------------------------------


def test_llamaindex_vectors(model, evidence):
    needs("llamaindex")
    from llama_index.core.base.embeddings.base import BaseEmbedding

    from fastinstructor.integrations.llamaindex import InstructorEmbedding

    embed_model = InstructorEmbedding(model)
    assert isinstance(embed_model, BaseEmbedding) and embed_model.model_name == str(model.checkpoint.path)
    assert (embed_model.query_instruction, embed_model.text_instruction) == (
        LANGCHAIN_QUERY_INSTRUCTION,
        LANGCHAIN_EMBED_INSTRUCTION,
    )
    texts = expected(model, evidence, LANGCHAIN_EMBED_INSTRUCTION)
    assert_close(embed_model.get_text_embedding_batch(evidence), texts)
    assert_close(embed_model.get_text_embedding(evidence[0]), texts[0])
    assert_close(
        embed_model.get_query_embedding(evidence[0]), expected(model, evidence[:1], LANGCHAIN_QUERY_INSTRUCTION)[0]
    )
    assert_close(asyncio.run(embed_model.aget_text_embedding_batch(evidence[:3])), texts[:3])
    assert_close(
        asyncio.run(embed_model.aget_query_embedding(evidence[1])),
        expected(model, evidence[1:2], LANGCHAIN_QUERY_INSTRUCTION)[0],
    )
    custom = InstructorEmbedding(model, query_instruction="Q:", text_instruction="D:")
    assert_close(custom.get_query_embedding(evidence[0]), expected(model, evidence[:1], "Q:")[0])
    assert_close(custom.get_text_embedding(evidence[0]), expected(model, evidence[:1], "D:")[0])


def test_llamaindex_refuses_a_cache_keyed_by_text_when_queries_have_their_own_instruction(model):
    """LlamaIndex caches query and text embeddings under the text alone: a query would get the document's vector."""
    needs("llamaindex")
    from llama_index.core.storage.kvstore import SimpleKVStore

    from fastinstructor.integrations.llamaindex import InstructorEmbedding

    with pytest.raises(ValueError, match="embeddings_cache keys LlamaIndex's cache by the text alone"):
        InstructorEmbedding(model, embeddings_cache=SimpleKVStore())
    same = InstructorEmbedding(model, query_instruction="I:", text_instruction="I:", embeddings_cache=SimpleKVStore())
    assert_close(same.get_query_embedding("a text"), expected(model, ["a text"], "I:")[0])


def test_llamaindex_adapter_pickles_and_round_trips_through_to_dict(tiny_model, evidence):
    """IngestionPipeline(num_workers=...) pickles the adapter, and LlamaIndex drops the model that does not pickle:
    the copy loads it again from the adapter's fields (a loaded model's options too), as from_dict does."""
    needs("llamaindex")
    import pickle

    from fastinstructor.integrations.llamaindex import InstructorEmbedding

    short = fastinstructor.load(tiny_model, backend="cpu", max_seq_length=8)
    for adapter in (InstructorEmbedding(short), InstructorEmbedding(str(tiny_model), backend="cpu")):
        wanted = adapter.get_text_embedding_batch(evidence[:3])
        for copy in (pickle.loads(pickle.dumps(adapter)), InstructorEmbedding.from_dict(adapter.to_dict())):
            assert copy.backend == "cpu" and copy.load_options == adapter.load_options
            assert_close(copy.get_text_embedding_batch(evidence[:3]), np.array(wanted, dtype=np.float32))
    assert InstructorEmbedding(short).load_options == {"max_seq_length": 8}


def test_llamaindex_vector_store_index_round_trip(model, evidence):
    needs("llamaindex")
    from llama_index.core import VectorStoreIndex
    from llama_index.core.schema import TextNode

    from fastinstructor.integrations.llamaindex import InstructorEmbedding

    index = VectorStoreIndex([TextNode(text=t) for t in evidence], embed_model=InstructorEmbedding(model))
    retriever = index.as_retriever(similarity_top_k=1)
    assert_each_finds_itself([retriever.retrieve(t)[0].node.get_content() for t in evidence], evidence)


# Chroma ---------------------------------------------------------------------------------------------------------------


def test_chroma_vectors_and_config(model, tiny_model, evidence):
    needs("chroma")
    from chromadb.utils.embedding_functions import known_embedding_functions

    from fastinstructor.integrations.chroma import InstructorEmbeddingFunction

    function = InstructorEmbeddingFunction(model)
    assert_close(function(evidence), expected(model, evidence, DEFAULT_DOCUMENT_INSTRUCTION))
    assert_close(function.embed_query(evidence[:2]), expected(model, evidence[:2], DEFAULT_QUERY_INSTRUCTION))
    plain = InstructorEmbeddingFunction(model, instruction=None, query_instruction="Q:")
    assert_close(plain(evidence[:2]), model.encode(evidence[:2]))
    assert_close(plain.embed_query(evidence[:2]), expected(model, evidence[:2], "Q:"))
    assert known_embedding_functions["fastinstructor"] is InstructorEmbeddingFunction and not function.is_legacy()
    config = function.get_config()
    assert config["model"] == str(model.checkpoint.path) and (config["backend"], config["precision"]) == (
        "cpu",
        "float32",
    )
    rebuilt = InstructorEmbeddingFunction.build_from_config({**config, "query_instruction": "Q:"})
    assert rebuilt.get_config()["query_instruction"] == "Q:"
    assert_close(rebuilt.embed_query(evidence[:2]), expected(model, evidence[:2], "Q:"))
    with pytest.raises(TypeError, match=r"sentences\[0\] is ndarray"):  # an image: this model embeds text only
        function([np.zeros((2, 2, 3), dtype=np.uint8)])
    with pytest.raises(TypeError, match="not one str"):
        function("a text")


def test_chroma_rebuilds_a_loaded_models_options_and_loads_each_model_once(tiny_model, evidence, monkeypatch):
    """Chroma rebuilds the function from its config on its own (create, configuration reads): the rebuilt one must
    embed as the original (a shorter max_seq_length, the sentence-transformers pooling rule), with the same model."""
    needs("chroma")
    import chromadb

    from fastinstructor.integrations import chroma

    short = fastinstructor.load(tiny_model, backend="cpu", max_seq_length=8, pooling_rule="sentence-transformers")
    function = chroma.InstructorEmbeddingFunction(short)
    assert function.get_config()["load_options"] == {"max_seq_length": 8, "pooling_rule": "sentence-transformers"}
    loads = []
    monkeypatch.setattr(chroma, "resolve_model", lambda *a, **k: loads.append(a) or pytest.fail("loaded again"))
    rebuilt = chroma.InstructorEmbeddingFunction.build_from_config(function.get_config())
    assert_close(rebuilt.embed_query(evidence[:2]), expected(short, evidence[:2], DEFAULT_QUERY_INSTRUCTION))
    collection = chromadb.EphemeralClient().create_collection("once", embedding_function=function)
    collection.add(ids=["a"], documents=[evidence[0]])
    collection.query(query_texts=[evidence[1]], n_results=1)
    assert not loads


def test_chroma_collection_finds_each_sentence_first(model, evidence):
    needs("chroma")
    import chromadb

    from fastinstructor.integrations.chroma import InstructorEmbeddingFunction

    client = chromadb.EphemeralClient()
    collection = client.create_collection("evidence-test", embedding_function=InstructorEmbeddingFunction(model))
    ids = [f"e{i}" for i in range(len(evidence))]
    collection.add(ids=ids, documents=evidence)
    result = collection.query(query_texts=evidence, n_results=1)
    assert [hits[0] for hits in result["ids"]] == ids
    assert_each_finds_itself([hits[0] for hits in result["documents"]], evidence)
    assert collection.configuration["embedding_function"].name() == "fastinstructor"


# Haystack -------------------------------------------------------------------------------------------------------------


def test_haystack_embedders(model, tiny_model, evidence):
    needs("haystack")
    from haystack import Document

    from fastinstructor.integrations.haystack import InstructorDocumentEmbedder, InstructorTextEmbedder

    text_embedder = InstructorTextEmbedder(model)
    assert_close(
        text_embedder.run(evidence[0])["embedding"], expected(model, evidence[:1], DEFAULT_QUERY_INSTRUCTION)[0]
    )
    documents = [Document(content=t, meta={"title": f"T{i}", "empty": None}) for i, t in enumerate(evidence)]
    embedder = InstructorDocumentEmbedder(model)
    out = embedder.run(documents)["documents"]
    assert [d.content for d in out] == evidence and all(d.embedding is None for d in documents)  # copies
    assert_close([d.embedding for d in out], expected(model, evidence, DEFAULT_DOCUMENT_INSTRUCTION))
    with_meta = InstructorDocumentEmbedder(
        model, meta_fields_to_embed=["title", "empty", "absent"], embedding_separator=" | "
    )
    wanted = expected(model, [f"T{i} | {t}" for i, t in enumerate(evidence)], DEFAULT_DOCUMENT_INSTRUCTION)
    assert_close([d.embedding for d in with_meta.run(documents)["documents"]], wanted)
    with pytest.raises(TypeError, match="embed a string with InstructorTextEmbedder"):
        embedder.run(evidence[:2])
    with pytest.raises(TypeError, match="embed documents with InstructorDocumentEmbedder"):
        text_embedder.run(documents[:1])
    with pytest.raises(TypeError, match="holds a loaded Instructor .* cannot be serialized"):
        embedder.to_dict()
    lazy = InstructorDocumentEmbedder(str(tiny_model), instruction="D:", backend="cpu", meta_fields_to_embed=["title"])
    again = InstructorDocumentEmbedder.from_dict(lazy.to_dict())
    assert again.to_dict() == lazy.to_dict() and again._model is None  # loads in warm_up, not before
    again.warm_up()
    assert_close(
        [d.embedding for d in again.run(documents[:2])["documents"]],
        expected(model, [f"T{i}\n{t}" for i, t in enumerate(evidence[:2])], "D:"),
    )


def test_haystack_pipeline_retrieves_the_right_document(model, evidence):
    needs("haystack")
    from haystack import Document, Pipeline
    from haystack.components.retrievers.in_memory import InMemoryEmbeddingRetriever
    from haystack.components.writers import DocumentWriter
    from haystack.document_stores.in_memory import InMemoryDocumentStore

    from fastinstructor.integrations.haystack import InstructorDocumentEmbedder, InstructorTextEmbedder

    store = InMemoryDocumentStore(embedding_similarity_function="cosine")
    indexing = Pipeline()
    indexing.add_component("embedder", InstructorDocumentEmbedder(model))
    indexing.add_component("writer", DocumentWriter(store))
    indexing.connect("embedder", "writer")
    indexing.run({"embedder": {"documents": [Document(content=t, id=f"e{i}") for i, t in enumerate(evidence)]}})
    query = Pipeline()
    query.add_component("embedder", InstructorTextEmbedder(model))
    query.add_component("retriever", InMemoryEmbeddingRetriever(store, top_k=1))
    query.connect("embedder.embedding", "retriever.query_embedding")
    found = [query.run({"embedder": {"text": t}})["retriever"]["documents"][0] for t in evidence]
    assert [d.id for d in found] == [f"e{i}" for i in range(len(evidence))]


# The README -----------------------------------------------------------------------------------------------------------


def readme_snippets() -> dict[str, str]:
    """The README's "Use it with..." section's Python snippets, by the integrations module each imports."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Use it with LangChain, LlamaIndex, Chroma or Haystack", 1)[1].split("\n## ", 1)[0]
    snippets = {}
    for code in re.findall(r"```python\n(.*?)```", section, flags=re.S):
        (module,) = set(re.findall(r"fastinstructor\.integrations\.(\w+)", code))
        snippets[module] = code
    return snippets


def test_the_readme_has_one_snippet_per_framework():
    assert sorted(readme_snippets()) == sorted(FRAMEWORKS)


@pytest.mark.parametrize("module", sorted(FRAMEWORKS))
def test_readme_snippet_runs(module, tiny_model, capsys):
    needs(module)
    code = readme_snippets()[module]
    assert '"hkunlp/instructor-large"' in code
    exec(compile(code.replace('"hkunlp/instructor-large"', repr(str(tiny_model))), f"README:{module}", "exec"), {})
    printed = capsys.readouterr().out.strip()
    assert printed in {"Arctic sea ice is shrinking.", "CO2 passed 420 ppm.", "[['ice']]", "[['co2']]"}, printed


def test_readme_sentence_transformers_snippet_runs(tiny_model):
    text = README.read_text(encoding="utf-8")
    code = text.split("Beside it, sentence-transformers' surface", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    scope = {"fastinstructor": fastinstructor}
    exec(compile(code.replace('"hkunlp/instructor-large"', repr(str(tiny_model))), "README:st", "exec"), scope)
    assert tuple(scope["scores"].shape) == (1, 2) and scope["bits"].shape == (1, scope["model"].dim // 8)
