"""Exports for `backend: onnxruntime` nodes, made before `ruyiflow up` starts them: each served
exit's export under the node's `onnx_dir` (`exit-<E>/`), reused while its manifest's model
fingerprint matches the model the topology names, re-made (with a progress bar) when missing
or stale."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def export_fingerprint(path: Path) -> str | None:
    """The model fingerprint an export was made from (None: no readable manifest)."""
    try:
        return str(json.loads((path / "manifest.json").read_text())["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepare_exports(topology_path: str, quiet: bool = False) -> list[Path]:
    """Make every missing or stale export the topology's onnxruntime nodes need; returns the
    export directories made."""
    from ruyiflow.cluster.topology import onnx_dir_for
    from ruyiflow.cluster.topology_yaml import load_topology

    topo = load_topology(topology_path)
    made: list[Path] = []
    loaded: dict[str, object] = {}
    for node in topo.nodes:
        if node.backend != "onnxruntime" or node.onnx_dir:
            continue  # an explicit onnx_dir is the user's: checked by the node, never rewritten
        root = onnx_dir_for(topo, node)
        for exit_layer in node.exits:
            if node.model not in loaded:
                loaded[node.model] = _load(topo.model(node.model))
            path = root / f"exit-{exit_layer}"
            if ensure_export(loaded[node.model], exit_layer, path, quiet=quiet):
                made.append(path)
    return made


def _load(spec):
    from ruyiflow.engine.checkpoint import load_model

    return load_model(spec.path, "float32", spec.extra_exits or None, overlay=spec.overlay_arg)


def ensure_export(
    model, exit_layer: int, path: Path, quant: str | None = None, quiet: bool = False
) -> bool:
    """Export `exit_layer` of `model` (a LoadedModel) to `path` unless an export of the same
    model fingerprint is there; True when one was made. Shows a progress bar unless `quiet`."""
    from ruyiflow.export.onnx_export import export_branch
    from ruyiflow.progress import progress_bar

    if export_fingerprint(path) == model.fingerprint:
        return False
    what = f"exit {exit_layer}" + (f" ({quant})" if quant else "")

    tmp = path.with_name(path.name + ".partial")
    for stale in (tmp, path):
        if stale.exists():
            shutil.rmtree(stale)
    with progress_bar(100, f"[ruyiflow] exporting {what}", "%", disable=quiet) as bar:
        export_branch(model, exit_layer, tmp, quant=quant, progress=bar.report)
    tmp.rename(path)  # only a finished export is ever found under `path`
    return True
