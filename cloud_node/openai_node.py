"""Opening a node whose backend is an external OpenAI-compatible engine: its tokenizer, the
exits its model has in the topology, a fingerprint of what it serves, and the API key from the
environment variable the topology names. The engine need not be up yet: the node listens
NOT_SERVING until it answers.

The tokenizer is optional. `tokenizer: PATH` must load; `tokenizer: none` means without one;
unset, the model's path is used when it holds one (a directory with `tokenizer.json`, a .gguf
file, `smollm2`), else the node runs without one (`cloud_node.text_prompts`): a model that
ships only a tiktoken vocabulary (Hunyuan-A13B) is served through the engine's own template
and counts. Its fingerprint then says so: `openai-notokenizer-...`."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

from ruyiflow.cloud_node.openai_backend import OpenAIBackend
from ruyiflow.cluster.errors import TopologyError
from ruyiflow.cluster.topology import NodeSpec, Topology
from ruyiflow.engine.tokenizer import Tokenizer
from ruyiflow.node.backend import OpenedBackend

log = logging.getLogger(__name__)
NO_TOKENIZER = "none"  # `tokenizer: none`: serve without one
MAX_STATE_BYTES = 64 << 20  # enough to read a pushed hidden state and refuse it by name


@functools.lru_cache(maxsize=4)
def load_tokenizer(source: str) -> Tokenizer:
    """A tokenizer from a Hugging Face directory, a .gguf file or `smollm2` (embedded); kept,
    since reading a GGUF's vocabulary takes seconds (several nodes in one test process)."""
    from ruyiflow.engine.checkpoint import EMBEDDED, embedded_gguf_path

    path = embedded_gguf_path() if source == EMBEDDED else Path(source).expanduser()
    if path.is_dir():
        return Tokenizer.from_dir(path)
    return Tokenizer.from_gguf(path)


def find_tokenizer(topology: Topology, spec: NodeSpec) -> Tokenizer | None:
    """The node's tokenizer, or None when it has none (see the module docstring)."""
    if spec.tokenizer is not None:
        return None if spec.tokenizer.lower() == NO_TOKENIZER else load_tokenizer(spec.tokenizer)
    from ruyiflow.engine.checkpoint import EMBEDDED

    source = topology.model(spec.model).path
    path = Path(source).expanduser()
    if source == EMBEDDED or (path.is_dir() and (path / "tokenizer.json").is_file()):
        return load_tokenizer(source)
    if path.is_file() and path.suffix == ".gguf":
        return load_tokenizer(source)
    log.info(
        "node %s: no tokenizer at %s (no tokenizer.json or .gguf): serving text through the "
        "engine's chat template and usage",
        spec.name,
        source,
    )
    return None


def engine_fingerprint(spec: NodeSpec, tokenizer: Tokenizer | None) -> str:
    """Names what the engine serves: its model id and our tokenizer's vocabulary (or that there
    is none). Never equal to a weights fingerprint, so the router never plans a hidden-state
    move into it."""
    if tokenizer is None:
        digest = hashlib.sha256(spec.served_model.encode()).hexdigest()[:16]
        return f"openai-notokenizer-{digest}"
    vocab = sorted(tokenizer.backend.get_vocab(with_added_tokens=True).items())
    digest = hashlib.sha256(repr((spec.served_model, vocab)).encode()).hexdigest()[:16]
    return f"openai-{digest}"


def model_exits(topology: Topology, spec: NodeSpec) -> tuple[int, ...]:
    """Exits of the node's model: known ones (embedded model) and all the topology serves."""
    known = topology.model(spec.model).known_exits or ()
    return tuple(sorted({*known, *topology.exit_tiers(spec.model)}))


def open_openai_backend(topology: Topology, spec: NodeSpec) -> OpenedBackend:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # it logs every request at INFO
    api_key = None
    if spec.api_key_env:
        api_key = os.environ.get(spec.api_key_env)
        if not api_key:
            raise TopologyError(
                f"node {spec.name!r}: environment variable {spec.api_key_env} (api_key_env) is "
                "not set"
            )
    tokenizer = find_tokenizer(topology, spec)
    fingerprint = engine_fingerprint(spec, tokenizer)
    backend = OpenAIBackend(spec, tokenizer, model_exits(topology, spec), fingerprint, api_key)
    backend.start()
    return OpenedBackend(
        backend,
        tokenizer or backend.text,
        backend.facts,
        fingerprint,
        0.0,
        MAX_STATE_BYTES,
        health=backend,
    )
