"""The server's request and response schemas, declared once as pydantic models: requests are validated with them
(``validate``: strict types, no unknown field; a failure is a 422 that names each field and what it must be), and
the OpenAPI document served at ``/openapi.json`` is built from them and the route table ``ROUTES``.

Responses are written as plain JSON by the endpoints (the hot path stays free of model construction); their
models here document them, and the tests check real responses against them."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError
from pydantic.json_schema import models_json_schema

from .protocol import HTTPError

__all__ = ["ROUTES", "EmbedRequest", "EmbeddingsRequest", "TokenizeRequest", "openapi_document", "validate"]

_TEXTS = "a text, or a non-empty list of texts"
_INSTRUCTION = (
    "an INSTRUCTOR instruction for every input (e.g. 'Represent the document for retrieval:'), or a list of one "
    "per input; '' for none. Without it nor prompt_name: the server's default instruction (GET /info)"
)
_PROMPT_NAME = "the name of one of the server's instructions (GET /info lists them); not with instruction"
Texts = str | Annotated[list[str], Field(min_length=1)]
Instruction = str | list[str] | None


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class EmbeddingsRequest(_Request):
    """OpenAI's embeddings request (``POST /v1/embeddings``), plus ``instruction`` and ``prompt_name``."""

    input: Texts = Field(description=_TEXTS)
    model: str | None = Field(None, description="the served model's name (GET /v1/models); another name is a 404")
    encoding_format: Literal["float", "base64"] = Field("float", description="'float' or 'base64' (little-endian f4)")
    dimensions: int | None = Field(None, description="the model's dimension only (GET /info: dim)")
    user: str | None = Field(None, description="accepted and ignored, as OpenAI's")
    instruction: Instruction = Field(None, description=_INSTRUCTION)
    prompt_name: str | None = Field(None, description=_PROMPT_NAME)


class EmbedRequest(_Request):
    """text-embeddings-inference's embed request (``POST /embed``), plus ``instruction``."""

    inputs: Texts = Field(description=_TEXTS)
    normalize: bool = Field(True, description="true or false: L2-normalize (INSTRUCTOR embeddings are unit-norm)")
    truncate: bool | None = Field(False, description="true or false: cut an input past the model's tokens (else 413)")
    truncation_direction: Literal["Right", "Left", "right", "left"] = Field(
        "Right", description="'Right' (keep the start of a text) or 'Left' (keep its end); the instruction is kept"
    )
    prompt_name: str | None = Field(None, description=_PROMPT_NAME)
    instruction: Instruction = Field(None, description=_INSTRUCTION)
    dimensions: int | None = Field(None, description="the model's dimension only (GET /info: dim)")


class TokenizeRequest(_Request):
    """text-embeddings-inference's tokenize request (``POST /tokenize``), plus ``instruction``."""

    inputs: Texts = Field(description=_TEXTS)
    add_special_tokens: bool = Field(True, description="true or false: include the closing </s>")
    prompt_name: str | None = Field(None, description=_PROMPT_NAME)
    instruction: Instruction = Field(None, description=_INSTRUCTION)
    truncation_direction: Literal["Right", "Left", "right", "left"] = Field(
        "Right", description="'Right' or 'Left', as /embed with truncate=true"
    )


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32")


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: Usage


class EmbedResponse(RootModel[list[list[float]]]):
    """One embedding per input."""


class Token(BaseModel):
    id: int
    text: str = Field(description="the characters the token covers, or the special token ('</s>')")
    special: bool
    start: int | None = Field(
        description="character offsets into the text the model reads: the instruction and the "
        "stripped text joined, (instruction + text.strip()).strip(); null for </s>"
    )
    stop: int | None
    instruction: bool = Field(description="the token starts inside the instruction")
    pooled: bool = Field(description="the embedding averages this token (INSTRUCTOR pools the text and </s> only)")


class TokenizeResponse(RootModel[list[list[Token]]]):
    """The tokens of each input, in order."""


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Info(BaseModel):
    """text-embeddings-inference's /info fields, then this server's own."""

    model_id: str
    model_sha: str | None
    model_dtype: str
    model_type: dict = Field(description='{"embedding": {"pooling": "mean"}}')
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int | None
    max_batch_requests: int
    max_client_batch_size: int
    auto_truncate: bool
    tokenization_workers: int
    version: str
    sha: str | None
    docker_label: str | None
    prompts: dict[str, str] = Field(description="the named instructions, by name (TEI calls them prompts)")
    default_prompt: str | None = Field(description="the default instruction's text, or null")
    default_prompt_name: str | None = Field(description="its name when it is a named one")
    model: str
    dim: int
    max_seq_length: int
    backend: str
    precision: str
    parity: dict | None
    limits: dict
    versions: dict[str, str]


class Status(BaseModel):
    status: str
    checks: dict[str, str] | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    """Every error, OpenAI's shape; ``code`` is the HTTP status."""

    error: ErrorDetail


# (method, path, summary, request model, response model, needs the API key when there is one)
ROUTES = (
    ("post", "/v1/embeddings", "OpenAI embeddings", EmbeddingsRequest, EmbeddingsResponse, True),
    ("get", "/v1/models", "OpenAI model list: the one model served", None, ModelList, True),
    ("get", "/v1/models/{model}", "OpenAI model card; another name is a 404", None, ModelCard, True),
    ("post", "/embed", "text-embeddings-inference embed", EmbedRequest, EmbedResponse, True),
    ("post", "/", "text-embeddings-inference's root route: /embed", EmbedRequest, EmbedResponse, True),
    ("post", "/tokenize", "text-embeddings-inference tokenize", TokenizeRequest, TokenizeResponse, True),
    ("get", "/info", "the model, its backend and parity, the limits", None, Info, True),
    ("get", "/health", "liveness: the process answers", None, Status, False),
    ("get", "/ready", "readiness: model loaded, parity passed, queue below its limit", None, Status, False),
    ("get", "/metrics", "Prometheus metrics", None, None, True),
    ("get", "/openapi.json", "this document", None, None, False),
)


def _kind(value) -> str:
    """What a JSON value is, for an error message."""
    if isinstance(value, list):
        if not value:
            return "an empty list"
        bad = next(((i, v) for i, v in enumerate(value) if not isinstance(v, str)), None)
        return "a list" if bad is None else f"a list whose item {bad[0]} is {_kind(bad[1])}"
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    return names.get(type(value), "an object")


def validate(schema: type[BaseModel], body: dict) -> BaseModel:
    """``body`` as a ``schema`` instance, or a 422 that names every wrong field, what it must be and what it was."""
    try:
        return schema.model_validate(body)
    except ValidationError as err:
        problems, params = [], []
        for error in err.errors():
            name = str(error["loc"][0]) if error["loc"] else ""
            if name in params:  # a union reports each of its alternatives: one message per field
                continue
            params.append(name)
            if name not in schema.model_fields and error["type"] != "extra_forbidden":  # e.g. a key that is no text
                accepted = ", ".join(schema.model_fields)
                problems.append(f"the body has a field name that is not valid text (accepted: {accepted})")
            elif error["type"] == "extra_forbidden":
                problems.append(f"unknown field '{name}' (accepted: {', '.join(schema.model_fields)})")
            elif error["type"] == "missing":
                problems.append(f"'{name}' is required: {schema.model_fields[name].description}")
            else:
                value = body.get(name)
                hint = ""
                if isinstance(value, list) and value and all(isinstance(v, (int, list)) for v in value):
                    hint = (
                        "; token ids are not accepted, send the texts (LangChain's OpenAIEmbeddings: "
                        "check_embedding_ctx_length=False)"
                    )
                problems.append(f"'{name}' must be {schema.model_fields[name].description}, got {_kind(value)}{hint}")
        raise HTTPError(422, "; ".join(problems), param=(params[0] or None) if params else None) from None


def openapi_document(title: str, version: str) -> dict:
    """The OpenAPI 3.1 document of ``ROUTES``, with every schema under ``components``."""
    models = {m for _, _, _, request, response, _ in ROUTES for m in (request, response) if m is not None}
    models.add(ErrorResponse)
    keys = [(m, "validation") for m in sorted(models, key=lambda m: m.__name__)]
    refs, schemas = models_json_schema(keys, ref_template="#/components/schemas/{model}")
    ref = {m: refs[(m, "validation")] for m in models}
    error = {"description": "an error", "content": {"application/json": {"schema": ref[ErrorResponse]}}}
    paths: dict = {}
    for method, path, summary, request, response, keyed in ROUTES:
        operation: dict = {"summary": summary, "operationId": f"{method}_{path.strip('/') or 'root'}".replace("/", "_")}
        if "{model}" in path:
            operation["parameters"] = [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]
        if request is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref[request]}},
            }
        ok = {"description": "success"}
        if response is not None:
            ok["content"] = {"application/json": {"schema": ref[response]}}
        elif path == "/metrics":
            ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
        operation["responses"] = {"200": ok, "default": error}
        if keyed:
            operation["security"] = [{"bearer": []}, {}]  # {}: when the server runs without API keys
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
