"""`export_branch`: write one branch of a loaded model as an ONNX export directory.

    out_dir/model.onnx          the graph (weights referenced as external data)
    out_dir/model.onnx.data     every weight, one file, each tensor 4 KiB-aligned
    out_dir/tokenizer.json ...  the tokenizer, loadable by `Tokenizer.from_dir(out_dir)`
    out_dir/manifest.json       written last: identity, runtime facts, size + sha256 per file

Weights come from the loaded FamilyModel's own tensors for the exit (an overlay of trained branch
weights is exported as loaded). float32 weights stream to the data file tensor by tensor, so
the graph proto stays small (graphs > 2 GB work); quantized weights are computed as they stream.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

import ruyiflow
from ruyiflow.engine.errors import InvalidRequest, ModelLoadError
from ruyiflow.engine.onnx import manifest as mf
from ruyiflow.engine.onnx.manifest import DATA_FILE, GRAPH_FILE, BranchFacts, Manifest
from ruyiflow.engine.tokenizer import Tokenizer
from ruyiflow.export.onnx_graph import IR_VERSION, OPSET, BranchGraph, as_array, build_branch_graph
from ruyiflow.export.quantize import MS_DOMAIN, quantize_graph

if TYPE_CHECKING:
    from ruyiflow.engine.checkpoint import LoadedModel

DEFAULT_MAX_CONTEXT = 8192  # RoPE table rows: 8192 x head_dim/2 x 2 x 4 B = 2 MiB at D = 64
ALIGN = 4096  # page-aligned external data can be memory-mapped by ONNX Runtime
INLINE_BYTES = 1024  # smaller initializers (shape constants, scalars) stay in the graph
# Everything an export writes: a directory holding only these may be overwritten.
EXPORT_NAMES = frozenset(
    {
        mf.MANIFEST_FILE,
        GRAPH_FILE,
        DATA_FILE,
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
        "additional_chat_templates",
    }
)
Progress = Callable[[str, float], None]  # (stage, fraction of the whole export done)


def export_branch(
    loaded: LoadedModel,
    exit_layer: int,
    out_dir: str | Path,
    quant: str | None = None,
    progress: Progress | None = None,
    max_context: int | None = None,
    quantize_head: bool = True,
) -> Manifest:
    """Export branch `exit_layer` of `loaded` (an engine.checkpoint.LoadedModel) to `out_dir`.

    `quant`: None (float32), 'int8' or 'int4' (MatMul weights as MatMulNBits, block 32).
    `max_context` caps the RoPE table (default min(max_position_embeddings, 8192)).
    `quantize_head`: quantize the output head too (it is the largest single matrix)."""
    report = progress or (lambda stage, fraction: None)
    c, tok = loaded.config, loaded.tokenizer
    if quant not in mf.QUANTS:
        raise InvalidRequest(f"quant {quant!r} unknown; choose int8, int4 or none")
    if not hasattr(loaded.model, "branches"):
        raise InvalidRequest("ONNX export covers dense familial models (not MoE)")
    c.check_exit(exit_layer)
    limit = max_context or min(c.max_position_embeddings, DEFAULT_MAX_CONTEXT)
    if not 1 <= limit <= c.max_position_embeddings:
        raise InvalidRequest(f"max_context {limit} outside 1..{c.max_position_embeddings}")
    out = _prepare_dir(Path(out_dir))
    started = time.perf_counter()
    report("graph", 0.0)
    graph = build_branch_graph(
        loaded.model, exit_layer, limit, separate_head=bool(quant) and quantize_head
    )
    details = quantize_graph(graph, quant, quantize_head) if quant else {}
    write_model(graph, out, lambda f: report("weights", 0.05 + 0.85 * f))
    report("tokenizer", 0.9)
    names = [GRAPH_FILE, DATA_FILE, *save_tokenizer(tok, out)]
    report("hash", 0.92)
    files = {name: mf.file_digest(out / name) for name in names}
    manifest = Manifest(
        model_name=loaded.name,
        fingerprint=loaded.fingerprint,
        exit=exit_layer,
        exits=tuple(c.exits),
        facts=BranchFacts(
            family=c.family,
            hidden_size=c.hidden_size,
            vocab_size=c.vocab_size,
            num_heads=c.num_heads,
            num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            num_trunk_layers=exit_layer,
            max_context=limit,
            eos_token_ids=tuple(dict.fromkeys((*tok.eos_token_ids, *c.eos_token_ids))),
            bos_token_id=c.bos_token_id if c.bos_token_id is not None else tok.bos_token_id,
            dtype="float32",
        ),
        quant=quant,
        overlay=Path(overlay).name if (overlay := getattr(loaded, "overlay", None)) else None,
        quant_details=details,
        opset=OPSET,
        onnx_version=onnx.__version__,
        onnxruntime_version=onnxruntime.__version__,
        ruyiflow_version=ruyiflow.__version__,
        files=files,
    )
    mf.write_manifest(out, manifest)
    report(f"done in {time.perf_counter() - started:.1f}s", 1.0)
    return manifest


def _prepare_dir(out: Path) -> Path:
    """An empty directory, or a previous export (overwritten): never someone else's files."""
    if out.exists() and not out.is_dir():
        raise InvalidRequest(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    foreign = [p.name for p in out.iterdir() if p.name not in EXPORT_NAMES]
    if foreign:
        raise InvalidRequest(
            f"{out}: holds files an export does not write ({', '.join(sorted(foreign)[:3])});"
            " choose an empty or new --out"
        )
    # Drop the old manifest first: an interrupted export must not look complete.
    (out / mf.MANIFEST_FILE).unlink(missing_ok=True)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    shutil.rmtree(out / "additional_chat_templates", ignore_errors=True)
    return out


def write_model(graph: BranchGraph, out: Path, progress: Callable[[float], None]) -> None:
    """Stream weights into DATA_FILE (aligned, in order) and write GRAPH_FILE referencing them."""
    total = sum(w.nbytes for w in graph.weights.values()) or 1
    initializers: list[TensorProto] = []
    written = 0
    with (out / DATA_FILE).open("wb") as fh:
        for name, weight in graph.weights.items():
            array = as_array(weight)
            if array.nbytes < INLINE_BYTES:
                initializers.append(numpy_helper.from_array(array, name))
                continue
            fh.write(b"\0" * (-fh.tell() % ALIGN))
            offset = fh.tell()
            fh.write(memoryview(np.ascontiguousarray(array)).cast("B"))
            initializers.append(_external(name, array, offset))
            written += array.nbytes
            progress(written / total)
    opsets = [helper.make_opsetid("", OPSET)]
    if any(n.domain == MS_DOMAIN for n in graph.nodes):  # MatMulNBits (int8, int4)
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    model = helper.make_model(
        graph.graph(initializers, "ruyiflow_branch"),
        opset_imports=opsets,
        producer_name="ruyiflow",
        producer_version=ruyiflow.__version__,
    )
    model.ir_version = IR_VERSION
    (out / GRAPH_FILE).write_bytes(model.SerializeToString())


def _external(name: str, array: np.ndarray, offset: int) -> TensorProto:
    t = TensorProto()
    t.name = name
    t.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    t.dims.extend(array.shape)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", DATA_FILE), ("offset", offset), ("length", array.nbytes)):
        entry = t.external_data.add()
        entry.key, entry.value = key, str(value)
    return t


_TEMPLATE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def save_tokenizer(tokenizer: Tokenizer, out: Path) -> list[str]:
    """Write `tokenizer` as a Hugging Face directory that `Tokenizer.from_dir` reads back with the
    same vocabulary, chat templates, special tokens and stop ids. Returns the files written."""
    import json

    tokenizer.backend.save(str(out / "tokenizer.json"))
    files = ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer.special_tokens, indent=2))
    generation = {"eos_token_id": list(tokenizer.eos_token_ids)}
    if tokenizer.bos_token_id is not None:
        generation["bos_token_id"] = tokenizer.bos_token_id
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tokenizer.chat_template is not None:
        (out / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
        files.append("chat_template.jinja")
    extra = out / "additional_chat_templates"
    for name, template in tokenizer.named_templates.items():
        if not _TEMPLATE_NAME.match(name):
            raise ModelLoadError(f"chat template name {name!r} cannot be a file name")
        extra.mkdir(exist_ok=True)
        (extra / f"{name}.jinja").write_text(template, encoding="utf-8")
        files.append(f"additional_chat_templates/{name}.jinja")
    return files
