"""The layers of DESIGN.md, held by the source: each package imports only those below it, the
engine knows nothing of gRPC, the router never needs torch, and loading a model imports no
training, export or evaluation code."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# repository folder -> the subpackage it installs as (pyproject's package-dir)
FOLDERS = {
    "proto": "ruyiflow.proto",
    "kernels": "ruyiflow.kernels",
    "engine": "ruyiflow.engine",
    "cluster": "ruyiflow.cluster",
    "node": "ruyiflow.node",
    "edge_node": "ruyiflow.edge_node",
    "cloud_node": "ruyiflow.cloud_node",
    "router": "ruyiflow.router",
    "bench": "ruyiflow.bench",
    "ruyiflow": "ruyiflow",
}
# layer -> the layers it may import (besides itself)
ALLOWED = {
    "proto": set(),
    "kernels": set(),
    "engine": {"kernels"},
    "cluster": {"engine", "proto"},
    "node": {"cluster", "engine", "kernels", "proto"},
    "edge_node": {"node", "cluster", "engine", "kernels", "proto"},
    "cloud_node": {"node", "cluster", "engine", "kernels", "proto"},
    "router": {"cluster", "engine", "proto"},
}
LAYERS = set(FOLDERS.values()) - {"ruyiflow"}
# third-party packages a layer must never import
FORBIDDEN_THIRD_PARTY = {
    "engine": {"grpc", "google", "prometheus_client", "yaml"},
    "kernels": {"grpc", "google", "prometheus_client", "yaml"},
}
LEGACY_TOP_LEVEL = set(FOLDERS) - {"ruyiflow"}


def layer_of(module: str) -> str:
    """'ruyiflow.engine.model' -> 'engine'; 'ruyiflow.cli' -> 'ruyiflow' (the top layer)."""
    parts = module.split(".")
    if len(parts) >= 2 and ".".join(parts[:2]) in LAYERS:
        return parts[1]
    return "ruyiflow"


def source_files() -> list[tuple[str, Path]]:
    """(module name, path) of every Python file the distribution installs."""
    out = []
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out.append((".".join([package, *parts]), path))
    return out


def imports_of(module: str, path: Path) -> list[tuple[str, int]]:
    """Absolute names of every module `path` imports (at any depth), with line numbers."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((base, node.lineno))
            # `from ruyiflow import kernels` imports the subpackage ruyiflow.kernels
            if base == "ruyiflow":
                found += [(f"ruyiflow.{alias.name}", node.lineno) for alias in node.names]
    return found


def test_every_installed_folder_is_mapped_in_pyproject() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    for folder, package in FOLDERS.items():
        assert f'"{package}" = "{folder}"' in text
    for init in ROOT.glob("*/**/__init__.py"):
        folder = init.relative_to(ROOT).parts[0]
        if folder in FOLDERS:
            rel = init.parent.relative_to(ROOT / folder)
            name = ".".join([FOLDERS[folder], *rel.parts])
            assert f'"{name}"' in text, f"{name} missing from [tool.setuptools] packages"


def test_layers_import_downward_only() -> None:
    problems = []
    for module, path in source_files():
        layer = layer_of(module)
        if layer in ("ruyiflow", "bench"):
            continue  # the command line, training, export, evaluation and benchmarks: on top
        for name, line in imports_of(module, path):
            top = name.split(".")[0]
            where = f"{path.relative_to(ROOT)}:{line}"
            if top in FORBIDDEN_THIRD_PARTY.get(layer, ()):
                problems.append(f"{where}: {layer} imports {name}")
            if top != "ruyiflow":
                continue
            target = layer_of(name)
            if name == "ruyiflow":
                continue
            if target != layer and target not in ALLOWED[layer]:
                problems.append(f"{where}: {layer} imports {name} ({target})")
    assert not problems, "\n".join(problems)


def test_no_module_imports_a_legacy_top_level_name() -> None:
    """`engine`, `router`, ... import only as `ruyiflow.engine`, `ruyiflow.router`, ...: a bare
    name works from a checkout's root but not from the installed wheel."""
    problems = []
    files = source_files() + [
        (".".join(p.relative_to(ROOT).with_suffix("").parts), p)
        for p in sorted((ROOT / "tests").rglob("*.py"))
    ]
    in_strings = re.compile(rf"[\"'](?:from|import) ({'|'.join(LEGACY_TOP_LEVEL)})[. ]")
    for module, path in files:
        for name, line in imports_of(module, path):
            if name.split(".")[0] in LEGACY_TOP_LEVEL:
                problems.append(f"{path.relative_to(ROOT)}:{line}: import {name}")
        # code a test runs in a subprocess (`python -c ...`) counts too
        for number, text in enumerate(path.read_text().splitlines(), 1):
            if in_strings.search(text):
                problems.append(f"{path.relative_to(ROOT)}:{number}: {text.strip()}")
    assert not problems, "\n".join(problems)


def _modules_after(code: str) -> set[str]:
    script = textwrap.dedent(code) + "\nimport sys\nprint('\\n'.join(sorted(sys.modules)))\n"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd="/", check=True
    )
    return set(out.stdout.split())


def test_router_daemon_never_imports_torch() -> None:
    loaded = _modules_after("import ruyiflow.router.daemon, ruyiflow.router.client")
    assert "torch" not in loaded
    assert not {m for m in loaded if m.startswith(("ruyiflow.node", "ruyiflow.engine.engine"))}


def test_engine_core_never_imports_grpc_or_cluster() -> None:
    loaded = _modules_after(
        "import ruyiflow.engine.engine, ruyiflow.engine.checkpoint, ruyiflow.engine.ort_engine"
    )
    assert not {m for m in loaded if m.split(".")[0] in ("grpc", "yaml", "prometheus_client")}
    assert not {m for m in loaded if m.startswith(("ruyiflow.cluster", "ruyiflow.router"))}


def test_loading_a_model_imports_no_training_export_or_evaluation_code() -> None:
    loaded = _modules_after(
        "from ruyiflow.engine.checkpoint import load_model\n"
        "from ruyiflow.engine.engine import Engine\n"
        "Engine(load_model('smollm2'))  # applies the shipped overlay"
    )
    assert "ruyiflow.engine.overlay" in loaded
    off_path = ("ruyiflow.distill", "ruyiflow.export", "ruyiflow.evaluation", "ruyiflow.scorer")
    assert not {m for m in loaded if m.startswith(off_path)}
