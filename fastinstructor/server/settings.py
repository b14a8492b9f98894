"""The server's settings (``ServerSettings``), the name it serves the model under (``served_name``), and every
``fastinstructor serve`` flag, declared once in ``OPTIONS``: the command line is built from that table
(``add_arguments``), and each flag is also read from its ``FASTINSTRUCTOR_<FLAG>`` environment variable, the
flag winning (``resolve``). This module imports neither starlette nor pydantic: ``fastinstructor --help`` works
without the server extra."""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..batching import DEFAULT_SERVER_POLICY, BatchPolicy
from ..precisions import canonical_precision

__all__ = ["OPTIONS", "Option", "ServerSettings", "add_arguments", "parse_instruction", "resolve", "served_name"]

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class ServerSettings:
    max_inputs: int = 512  # per request
    max_body_bytes: int = 4 * 2**20
    # tokens per backend call: padded (rows x longest), or real tokens on a backend that takes packed batches
    max_batch_tokens: int | None = DEFAULT_SERVER_POLICY.max_tokens
    max_batch_rows: int = DEFAULT_SERVER_POLICY.max_rows
    # 0: a batch takes what queued while the backend was busy, and a lone request never waits (measured:
    # bench/results/serve-*.md); more trades latency for fuller batches on bigger machines.
    max_wait_ms: float = 0.0
    max_queued_rows: int = 8192  # beyond this: 429
    request_timeout_s: float = 60.0  # also bounds the time a request's body takes to arrive (then: 408)
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    metrics_without_key: bool = False  # /metrics answers loopback clients without the key (a local scraper)
    cors_origins: tuple[str, ...] = ()  # none: no CORS headers, browsers on other origins are refused
    # Enforced by ``serve`` (the connection, not the app): beyond max_connections a new connection is answered
    # 503 and closed; a client has header_timeout_s to send a request's headers; keep-alive idles are closed.
    max_connections: int = 512
    header_timeout_s: float = 10.0
    keep_alive_timeout_s: float = 5.0
    # Named instructions ((name, text) pairs), selected by a request's prompt_name; the default instruction (a
    # name among them, or a text) is used by a request that sends neither instruction nor prompt_name.
    instructions: tuple[tuple[str, str], ...] = ()
    default_instruction: str | None = None

    def __post_init__(self) -> None:
        _ = self.batch_policy  # max_batch_rows and max_batch_tokens are checked there
        for name in ("max_inputs", "max_body_bytes", "max_queued_rows", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        for name in ("request_timeout_s", "header_timeout_s", "keep_alive_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        names = [name for name, _ in self.instructions]
        for name in names:
            if not _NAME.fullmatch(name):
                raise ValueError(
                    f"instruction name {name!r} is not 1-64 letters, digits, '_', '.' or '-'; e.g. query=Represent ..."
                )
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"instruction name(s) {twice} given more than once; give each name one text")
        default = self.default_instruction
        if default is not None and default not in names and _NAME.fullmatch(default):
            # INSTRUCTOR instructions are sentences; a single word is a misspelt name, not an instruction.
            raise ValueError(
                f"default instruction {default!r} is no instruction name (named: {sorted(names) or 'none'}); give "
                "one of those names, or a text such as 'Represent the document for retrieval:'"
            )

    @property
    def named_instructions(self) -> dict[str, str]:
        return dict(self.instructions)

    @property
    def default_instruction_text(self) -> str | None:
        """The default instruction's text: the named instruction it names, else the text itself."""
        value = self.default_instruction
        return self.named_instructions.get(value, value) if value is not None else None

    @property
    def batch_policy(self) -> BatchPolicy:
        """How the batcher cuts the queue into backend calls: ``max_batch_rows`` rows, ``max_batch_tokens``."""
        return self.batch_policy_for(packed_input=False)

    def batch_policy_for(self, packed_input: bool) -> BatchPolicy:
        """``batch_policy`` for a backend: on one that takes packed batches (``packed_input``, the triton backend)
        ``max_batch_tokens`` counts real tokens, since padding costs it nothing; the numbers are the same."""
        return BatchPolicy(self.max_batch_rows, self.max_batch_tokens, packed=packed_input)


def served_name(model: str) -> str:
    """The name clients see for ``model`` (``serve``'s argument): a hub id as given, a local folder by its last
    component, so that no response tells a client where the server keeps its files."""
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model


def parse_instruction(value: str) -> tuple[str, str]:
    """``NAME=TEXT`` (``--instruction``) as ``(name, text)``; the text may hold '=' and be empty."""
    name, sep, text = value.partition("=")
    if not sep or not name.strip():
        raise ValueError(
            f"--instruction expects NAME=TEXT, e.g. 'query=Represent the question for retrieving supporting "
            f"documents:', got {value!r}"
        )
    return name.strip(), text


def _boolean(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false (1/0, yes/no, on/off), got {value!r}")


THREADS_HELP = "CPU threads to compute on (PyTorch, ONNX Runtime, the tokenizer; default: every core)"


def _engine(value: str) -> str:
    if value not in ("local", "ray"):
        raise argparse.ArgumentTypeError(f"engine must be local or ray, got {value!r}")
    return value


def positive_int(value: str) -> int:
    """A flag's (or its environment variable's) whole number of at least 1; every command's counts use it."""
    if not str(value).isdecimal() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value!r}")
    return int(value)


def whole_number(value: str) -> int:
    """A flag's whole number of 0 or more (an index)."""
    if not value.isdecimal():
        raise argparse.ArgumentTypeError(f"expected a whole number (0 or more), got {value!r}")
    return int(value)


def comma_list(kind):
    """A flag's comma-separated list of ``kind``."""

    def parse(value: str) -> list:
        try:
            return [kind(part) for part in value.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {value!r}") from None

    return parse


def _precision(value: str) -> str:
    try:
        return canonical_precision(value, allow_auto=True)
    except ValueError as err:  # argparse shows this message as it is
        raise argparse.ArgumentTypeError(str(err)) from None


@dataclass(frozen=True)
class Option:
    """One ``serve`` flag: its type (``bool``: a switch), default, help, and whether it repeats."""

    flag: str
    kind: Callable = str
    default: object = None
    help: str = ""
    repeat: bool = False
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")

    @property
    def env(self) -> str:
        return "FASTINSTRUCTOR_" + self.dest.upper()


OPTIONS = (
    Option("--model", help="checkpoint folder or hub id (required)"),
    Option("--backend", default="auto", help="auto (default), or one of the backends; see fastinstructor check"),
    Option("--precision", _precision, "auto", "auto (default), float32, bfloat16, float16, int8, float8 or an alias"),
    Option(
        "--max-seq-length", positive_int, None, "tokens per input, at most the checkpoint's (default: the checkpoint's)"
    ),
    Option("--threads", positive_int, None, THREADS_HELP),
    Option("--host", default="127.0.0.1", help="default 127.0.0.1 (loopback only)"),
    Option("--port", int, 8080, "default 8080"),
    Option(
        "--served-model-name",
        help="the model's name in responses and /v1/models (default: the hub id, or "
        "the checkpoint folder's name; never a path)",
    ),
    Option(
        "--instruction",
        help="a named instruction, NAME=TEXT (repeatable), selected by a request's prompt_name",
        repeat=True,
        metavar="NAME=TEXT",
    ),
    Option(
        "--default-instruction",
        help="the instruction for requests that send neither instruction nor "
        "prompt_name: a NAME of --instruction, or a text (default: none, texts are pooled whole)",
        metavar="NAME|TEXT",
    ),
    Option(
        "--api-key", help="accepted key (repeatable; FASTINSTRUCTOR_API_KEYS, comma-separated, also works)", repeat=True
    ),
    Option("--max-inputs", int, 512, "inputs per request (default 512)"),
    Option(
        "--max-batch-tokens",
        int,
        DEFAULT_SERVER_POLICY.max_tokens,
        f"tokens per batch: padded (rows x longest), real tokens on the triton backend (default "
        f"{DEFAULT_SERVER_POLICY.max_tokens})",
    ),
    Option(
        "--max-batch-rows",
        int,
        DEFAULT_SERVER_POLICY.max_rows,
        f"rows per batch (default {DEFAULT_SERVER_POLICY.max_rows}; 1 disables batching)",
    ),
    Option(
        "--max-wait-ms",
        float,
        0.0,
        "how long a batch waits for more rows, counted from its oldest row's arrival (default 0)",
    ),
    Option("--max-queued-rows", int, 8192, "queue bound; beyond it: 429, and /ready answers 503 (default 8192)"),
    Option("--max-body-bytes", int, 4 * 2**20, "request body bound; beyond it: 413 (default 4 MiB)"),
    Option(
        "--request-timeout",
        float,
        60.0,
        "seconds before a request is answered 504, and for its body to arrive (else 408; default 60)",
    ),
    Option("--max-connections", int, 512, "open connections; beyond: 503 and closed (default 512)"),
    Option(
        "--header-timeout",
        float,
        10.0,
        "seconds a client has to send a request's headers; then 408 and closed (default 10)",
    ),
    Option("--keep-alive-timeout", float, 5.0, "seconds an idle connection stays open (default 5)"),
    Option(
        "--metrics-without-key",
        bool,
        False,
        "with --api-key: let loopback clients (a local scraper) read /metrics without a key",
    ),
    Option("--cors-origin", help="allow browsers on this origin (repeatable; default: CORS off)", repeat=True),
    # On a Ray cluster (fastinstructor.ray, the ray extra): a Ray Serve deployment of the same application.
    Option("--engine", _engine, "local", "local (default: this process) or ray (a Ray Serve deployment)"),
    Option("--address", help="with --engine ray: the Ray cluster (auto: the running one; default: a new local one)"),
    Option("--replicas", positive_int, 1, "with --engine ray: replicas, or the fewest with --max-replicas (default 1)"),
    Option(
        "--max-replicas", positive_int, None, "with --engine ray: autoscale up to this many replicas (default fixed)"
    ),
    Option("--replica-cpus", float, 1.0, "with --engine ray: CPUs per replica, also its threads (default 1)"),
    Option("--replica-gpus", float, 0.0, "with --engine ray: GPUs per replica (default 0)"),
)

ENVIRONMENT_HELP = (
    "Every flag can also be set by an environment variable, FASTINSTRUCTOR_ and the flag's name in capitals with "
    "'_' for '-' (shown as [env: ...]); a flag given on the command line wins over its variable. A switch's "
    "variable takes true or false; a repeatable flag's takes one value or a JSON list of values, e.g. "
    """FASTINSTRUCTOR_INSTRUCTION='["query=Represent the question for retrieving supporting documents:", """
    """"doc=Represent the document for retrieval:"]'."""
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` flags of ``OPTIONS`` on ``parser``. A flag left out is absent from the parsed namespace
    (argparse.SUPPRESS), so that ``resolve`` can tell it from one given with its default value."""
    from ..backends import BACKENDS

    parser.epilog = ENVIRONMENT_HELP
    for option in OPTIONS:
        kwargs: dict = {"default": argparse.SUPPRESS, "help": f"{option.help} [env: {option.env}]"}
        if option.kind is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=option.kind, metavar=option.metavar)
            if option.repeat:
                kwargs["action"] = "append"
            if option.flag == "--backend":
                kwargs["choices"] = ["auto", *BACKENDS]
        parser.add_argument(option.flag, **kwargs)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """``embed``'s flags for a Ray cluster (``fastinstructor.ray.embed_dataset``), beside ``serve``'s engine flags."""
    parser.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local (default: this process) or ray: the job's --num-shards parts (default: one per actor the cluster "
        "holds) as Ray actors of --threads CPUs (default 1) each, every part a complete job folder OUTPUT/part-K-of-N/",
    )
    parser.add_argument("--address", help="with --engine ray: the Ray cluster (auto: the running one; default: new)")
    parser.add_argument("--actor-gpus", type=float, default=0.0, help="with --engine ray: GPUs per actor (default 0)")


def _from_environment(option: Option, raw: str):
    """``raw``, the value of ``option``'s environment variable, converted as the flag converts its argument."""
    try:
        if option.kind is bool:
            return _boolean(raw)
        if option.repeat:
            text = raw.strip()
            values = json.loads(text) if text.startswith("[") else [raw]
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise ValueError("expected one value or a JSON list of strings")
            return [option.kind(v) for v in values]
        return option.kind(raw)
    except (ValueError, argparse.ArgumentTypeError) as err:
        raise ValueError(f"{option.env}={raw!r} is not a valid value for {option.flag}: {err}") from None


def resolve(given: Mapping[str, object], environ: Mapping[str, str] | None = None) -> dict[str, object]:
    """Every ``serve`` setting by its ``dest``: the flag where ``given`` (the parsed flags) has it, else its
    environment variable, else its default. Raises ValueError naming the variable for a value it cannot take."""
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for option in OPTIONS:
        if option.dest in given:
            values[option.dest] = given[option.dest]
        elif option.env in environ:
            values[option.dest] = _from_environment(option, environ[option.env])
        else:
            values[option.dest] = option.default
    if values["api_key"] is None and environ.get("FASTINSTRUCTOR_API_KEYS"):  # the older, comma-separated form
        values["api_key"] = [k for k in environ["FASTINSTRUCTOR_API_KEYS"].split(",") if k]
    if not values["model"]:
        raise ValueError("no model: pass --model (a checkpoint folder or hub id) or set FASTINSTRUCTOR_MODEL")
    from ..backends import BACKENDS

    if values["backend"] not in ("auto", *BACKENDS):
        raise ValueError(f"unknown backend {values['backend']!r}; choose one of: auto, {', '.join(BACKENDS)}")
    return values


def settings_from(values: Mapping[str, object]) -> ServerSettings:
    """``ServerSettings`` from ``resolve``'s values."""
    return ServerSettings(
        max_inputs=values["max_inputs"],
        max_batch_tokens=values["max_batch_tokens"],
        max_batch_rows=values["max_batch_rows"],
        max_wait_ms=values["max_wait_ms"],
        max_queued_rows=values["max_queued_rows"],
        max_body_bytes=values["max_body_bytes"],
        request_timeout_s=values["request_timeout"],
        api_keys=tuple(values["api_key"] or ()),
        metrics_without_key=values["metrics_without_key"],
        cors_origins=tuple(values["cors_origin"] or ()),
        max_connections=values["max_connections"],
        header_timeout_s=values["header_timeout"],
        keep_alive_timeout_s=values["keep_alive_timeout"],
        instructions=tuple(parse_instruction(v) for v in values["instruction"] or ()),
        default_instruction=values["default_instruction"],
    )
