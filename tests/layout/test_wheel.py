"""The wheel installs one import name, `ruyiflow`, with every subpackage and shipped file inside it.

The repository keeps top-level folders (`engine/`, `router/`, `kernels/`, ...) that pyproject maps
onto `ruyiflow.engine`, `ruyiflow.router`, ... A mapping slip puts a bare `engine` or `kernels`
into site-packages, where `kernels` collides with Hugging Face's package of that name. So: build
the wheel from the source tree (the files a clone would have, copied out so the build writes
nothing into the checkout), install it into a fresh venv, and look at what landed there. The
fresh venv has none of the dependencies, so the import check runs every module and accepts only
"a third-party dependency is missing" as a reason to stop.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

from tests.layout import test_shipped_files as shipped

ROOT = Path(__file__).resolve().parents[2]
LAYOUT = shipped.LAYOUT
SUBPACKAGES = (
    "engine",
    "router",
    "kernels",
    "proto",
    "cluster",
    "node",
    "edge_node",
    "cloud_node",
    "bench",
)
# names that landed in site-packages before the one-namespace layout
LEGACY_TOP_LEVEL = {*SUBPACKAGES, "distill", "evaluation", "export", "scorer"}
# modules that need only the standard library: each must import in a venv holding only the wheel
STDLIB_ONLY = ("ruyiflow", "ruyiflow.engine.errors", "ruyiflow.evaluation.prompts")
TIMEOUT = 120


@dataclass(frozen=True)
class Installed:
    wheel: Path
    python: Path  # the fresh venv's interpreter
    site: Path  # its site-packages
    before: frozenset[str]  # what site-packages held before the wheel went in


def _run(args: list[str | Path], **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=TIMEOUT, **kwargs
    )
    assert out.returncode == 0, f"{' '.join(map(str, args))}\n{out.stdout}\n{out.stderr}"
    return out


def _source_files() -> list[Path]:
    """The tree a build sees: tracked files plus new ones git does not ignore (not .venv, build/,
    caches); without git, everything but those."""
    if shipped.git_checkout_reason() is None:
        listed = _run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT
        )
        files = [ROOT / p for p in listed.stdout.split("\0") if p]
        return [p for p in files if p.is_file()]  # deleted but not yet staged: gone
    skip = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache"}
    return [
        p
        for p in ROOT.rglob("*")
        if p.is_file()
        and not skip & set(p.relative_to(ROOT).parts)
        and not any(part.endswith(".egg-info") for part in p.relative_to(ROOT).parts)
    ]


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    try:
        import setuptools  # noqa: F401  (--no-build-isolation builds with this environment's)
    except ImportError:
        pytest.skip("setuptools is not installed in this environment")
    tmp = tmp_path_factory.mktemp("wheel")
    tree = tmp / "src"
    for path in _source_files():
        target = tree / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    dist = tmp / "dist"
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, tree],
         cwd=tmp, env=_clean_env())  # fmt: skip
    (wheel,) = dist.glob("ruyiflow-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp, env=_clean_env())
    python = venv / "bin" / "python"
    site = Path(
        _run(
            [python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            cwd="/",
            env=_clean_env(),
        ).stdout.strip()
    )
    before = frozenset(p.name for p in site.iterdir())
    _run([*pip, "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
         cwd=tmp, env=_clean_env())  # fmt: skip
    return Installed(wheel, python, site, before)


def _top_level(names: list[str]) -> set[str]:
    """First path component of each entry, without the dist-info folder and scripts (`../bin`)."""
    tops = {PurePosixPath(n).parts[0] for n in names if n and not n.startswith("..")}
    return {t for t in tops if not t.endswith((".dist-info", ".data"))}


def test_wheel_holds_one_top_level_name(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = wheel.namelist()
        tops = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        top_level = wheel.read(tops[0]).decode().split() if tops else ["ruyiflow"]
    assert _top_level(names) == {"ruyiflow"}, sorted(_top_level(names))
    assert top_level == ["ruyiflow"], top_level


def test_venv_gains_only_ruyiflow(installed: Installed) -> None:
    (dist_info,) = installed.site.glob("ruyiflow-*.dist-info")
    record = (dist_info / "RECORD").read_text().splitlines()
    assert _top_level([line.split(",")[0] for line in record]) == {"ruyiflow"}
    added = {p.name for p in installed.site.iterdir()} - installed.before
    assert added == {"ruyiflow", dist_info.name}, sorted(added)
    legacy = sorted(n for n in LEGACY_TOP_LEVEL if (installed.site / n).exists())
    assert not legacy, f"bare top-level names in site-packages: {legacy}"


def test_every_subpackage_and_module_is_installed(installed: Installed) -> None:
    pkg = installed.site / "ruyiflow"
    for name in SUBPACKAGES:
        assert (pkg / name / "__init__.py").is_file(), f"ruyiflow.{name} is not installed"
    missing = []
    for folder in sorted(set(LAYOUT.packages.values())):
        for module in sorted(folder.glob("*.py")):
            if not (installed.site / LAYOUT.installed_of(module)).is_file():
                missing.append(str(LAYOUT.installed_of(module)))
    assert not missing, f"modules left out of the wheel: {missing}"


def test_shipped_files_are_installed(installed: Installed) -> None:
    """What the source names as shipped (test_shipped_files' discovery: module constants, the
    package-data globs, the named floor) is inside the installed package, byte for byte."""
    expected = sorted(shipped.shipped_paths())
    for name in ("router/models/scorer-smollm2.onnx", "engine/overlays/smollm2-exits.safetensors"):
        assert ROOT / name in expected
    problems = []
    for source in expected:
        target = installed.site / LAYOUT.installed_of(source)
        rel = source.relative_to(ROOT)
        if not target.exists():
            problems.append(f"{rel}: not installed (expected at {target})")
        elif source.is_dir():
            if not any(target.iterdir()):
                problems.append(f"{rel}: installed empty")
        elif target.read_bytes() != source.read_bytes():
            problems.append(f"{rel}: installed copy differs")
    assert not problems, "\n".join(problems)


_IMPORT_ALL = r"""
import importlib, json, pathlib, sys
root = pathlib.Path(sys.argv[1])
modules = []
for path in sorted(root.rglob("*.py")):
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    modules.append(".".join(parts))
out = {}
for name in modules:
    try:
        module = importlib.import_module(name)
        out[name] = ["ok", getattr(module, "__file__", "")]
    except ModuleNotFoundError as exc:
        out[name] = ["missing", exc.name or ""]
    except BaseException as exc:
        out[name] = ["error", f"{type(exc).__name__}: {exc}"]
print(json.dumps({"path": sys.path, "modules": out}))
"""


def test_modules_import_from_the_venv_alone(installed: Installed) -> None:
    """Run from `/` with `-I` (no source tree, no PYTHONPATH, no user site), every installed module
    either imports from the venv or stops at a missing third-party dependency, never at a bare
    `engine` / `router` / ... or at a ruyiflow module the wheel lacks."""
    out = _run(
        [installed.python, "-I", "-c", _IMPORT_ALL, installed.site / "ruyiflow"],
        cwd="/",
        env=_clean_env(),
    )
    report = json.loads(out.stdout.splitlines()[-1])
    assert str(ROOT) not in report["path"] and "" not in report["path"], report["path"]
    problems = []
    for name, (status, detail) in sorted(report["modules"].items()):
        if status == "ok":
            if not Path(detail).is_relative_to(installed.site):
                problems.append(f"{name}: imported from {detail}, not the venv")
        elif status == "error":
            problems.append(f"{name}: {detail}")
        elif detail.split(".")[0] in LEGACY_TOP_LEVEL | {"ruyiflow"}:
            problems.append(f"{name}: imports {detail}, which the venv does not have")
    for name in STDLIB_ONLY:
        assert report["modules"].get(name, [""])[0] == "ok", f"{name}: {report['modules'][name]}"
    assert not problems, "\n".join(problems)


def test_entry_point_is_installed(installed: Installed) -> None:
    script = installed.python.parent / "ruyiflow"
    assert script.is_file(), "console script `ruyiflow` not installed"
    assert f"#!{installed.python}" in script.read_text().splitlines()[0]
    assert "from ruyiflow.cli import main" in script.read_text()


def test_shipped_prompt_sets_load_from_the_installed_package(installed: Installed) -> None:
    """A stdlib-only reader finds its data beside itself once installed (`DATA_DIR`)."""
    code = (
        "from ruyiflow.evaluation.prompts import HELDOUT_PROMPTS, TRAIN_PROMPTS, load_prompts\n"
        "print(TRAIN_PROMPTS, len(load_prompts(TRAIN_PROMPTS)), len(load_prompts(HELDOUT_PROMPTS)))"
    )
    out = _run([installed.python, "-I", "-c", code], cwd="/", env=_clean_env()).stdout.split()
    assert Path(out[0]).is_relative_to(installed.site), out
    assert int(out[1]) > 0 and int(out[2]) > 0, out
