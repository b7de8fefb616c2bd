"""The repository keeps the design card's top-level folders (kernels/, router/, ...), which
install as ruyiflow.* subpackages. None of them may shadow an installed distribution of the same
import name: transformers >= 5.25 imports Hugging Face's `kernels`, and a test run that put the
repository root first on sys.path handed it ours instead (ImportError: CUDAProperties)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())


def _installed_top_level_names() -> set[str]:
    names = set()
    for dist in importlib.metadata.distributions():
        if dist.metadata["Name"] and dist.metadata["Name"].lower() == "ruyiflow":
            continue
        top = dist.read_text("top_level.txt")
        names.update(top.split() if top else [])
        for f in dist.files or []:
            if len(f.parts) == 2 and f.parts[1] == "__init__.py":
                names.add(f.parts[0])
    return names


def test_repository_folders_are_the_expected_packages():
    assert "kernels" in FOLDERS and "router" in FOLDERS, FOLDERS


@pytest.mark.parametrize("name", sorted(set(FOLDERS) & _installed_top_level_names()) or ["-"])
def test_an_installed_package_wins_over_a_repository_folder(name):
    """In the test process itself: `import <name>` finds the installed package, not ours."""
    if name == "-":
        pytest.skip("no installed distribution shares a name with a repository folder")
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None
    assert not Path(spec.origin).resolve().is_relative_to(ROOT / name), (name, spec.origin)


def test_daemons_do_not_import_from_the_working_directory(tmp_path):
    """`ruyiflow up` starts its daemons with `python -P`: a folder named like a dependency in the
    directory `up` runs from is never imported in their place."""
    from ruyiflow.cmd_up import children_of

    topology = ROOT / "topology.yaml"
    for child in children_of(str(topology)):
        assert child.argv[:3] == [sys.executable, "-P", "-m"], child.argv
    (tmp_path / "yaml").mkdir()
    (tmp_path / "yaml" / "__init__.py").write_text("raise ImportError('shadowed')\n")
    probe = "import yaml, sys; print(yaml.__file__)"
    done = subprocess.run(
        [sys.executable, "-P", "-c", probe], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0 and str(tmp_path) not in done.stdout, done.stdout + done.stderr
