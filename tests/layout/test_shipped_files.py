"""Files the package ships are in git: a fresh clone, and the wheel built from it, has them.

"Shipped" is found, not listed by hand:

- every path the source builds from its own location (`Path(__file__)...`, `os.path.dirname(
  __file__)...`, and module constants built on those, such as `DATA_DIR / "prompts-train.jsonl"`),
  read with `ast` from every module the distribution installs, so a new `SHIPPED_...` constant is
  covered without touching this test;
- every file matched by pyproject's `[tool.setuptools.package-data]` globs, and each glob must match
  at least one tracked file;
- a few named files (the proto contract, the prompt sets, the C kernel) as a floor.

Each must be tracked by git and not matched by `.gitignore` (`git check-ignore --no-index`: a
tracked file that the ignore rules match is one `git add` away from being left out again). Each
path the source builds must also resolve, in the *installed* layout (`engine/` is
`ruyiflow/engine/` there), to a file or folder the wheel ships.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import textwrap
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Where the installed layout is evaluated: a path that leaves it leaves site-packages.
SITE = PurePosixPath("/site-packages")

# A floor under the discovery: these must be found by it (or by the package-data globs).
NAMED = (
    "router/models/scorer-smollm2.onnx",
    "engine/overlays/smollm2-exits.safetensors",
    "ruyiflow/data/prompts-train.jsonl",
    "ruyiflow/data/prompts-heldout.jsonl",
    "ruyiflow/distill/seed_prompts.txt",
    "kernels/cpu_gemv.c",
    "proto/ruyiflow.proto",
)
# Known wrong references, keyed by "file: expression" so that a fix (which changes the
# expression) drops the key instead of leaving a stale marker behind.
KNOWN_BROKEN_IN_WHEEL: dict[str, str] = {}


# ---------------------------------------------------------------------------------------------
# pyproject: packages, their folders, package data


@dataclass(frozen=True)
class Layout:
    packages: dict[str, Path]  # package name -> source folder (absolute)
    package_data: dict[str, tuple[str, ...]]  # package name (or "*") -> globs

    def source_of(self, installed: PurePosixPath) -> tuple[str, Path] | None:
        """(package, source path) of an installed path relative to site-packages; None when no
        package of the distribution holds it."""
        parts = installed.parts
        for n in range(len(parts), 0, -1):
            package = ".".join(parts[:n])
            if package in self.packages:
                return package, self.packages[package].joinpath(*parts[n:])
        return None

    def installed_of(self, source: Path) -> PurePosixPath | None:
        """Where a source path lands in site-packages (the deepest package folder holding it)."""
        best = None
        for package, folder in self.packages.items():
            if source == folder or folder in source.parents:
                if best is None or len(folder.parts) > len(self.packages[best].parts):
                    best = package
        if best is None:
            return None
        rel = source.relative_to(self.packages[best])
        return PurePosixPath(*best.split("."), *rel.parts)

    def data_files(self, package: str) -> set[Path]:
        """Files the package-data globs put into the wheel for `package`."""
        folder = self.packages[package]
        globs = self.package_data.get(package, ()) + self.package_data.get("*", ())
        return {p for g in globs for p in folder.glob(g) if p.is_file()}

    def ships(self, installed: PurePosixPath) -> bool:
        """Whether the wheel holds this installed path (a module, a package-data file, or a folder
        holding one of those)."""
        found = self.source_of(installed)
        if found is None:
            return False
        package, source = found
        if source.is_dir():
            return any(self.ships(self.installed_of(p)) for p in source.rglob("*") if p.is_file())
        if source.parent == self.packages[package] and source.suffix == ".py":
            return source.is_file()
        return source in self.data_files(package)


def read_layout(root: Path = ROOT) -> Layout:
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir = config.get("package-dir", {})

    def folder(package: str) -> Path:
        parts = package.split(".")
        for n in range(len(parts), -1, -1):
            prefix = ".".join(parts[:n])
            if prefix in package_dir:
                return root.joinpath(package_dir[prefix], *parts[n:])
        return root.joinpath(*parts)

    data = {("*" if k == "" else k): tuple(v) for k, v in config.get("package-data", {}).items()}
    return Layout({p: folder(p) for p in config["packages"]}, data)


# ---------------------------------------------------------------------------------------------
# paths the source builds from __file__


class Unresolved(Exception):
    pass


_PATH_TYPES = {"Path", "PurePath", "PosixPath", "PurePosixPath"}
_OS_PATH_SAME = {"abspath", "realpath", "normpath"}


def _is_file_name(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "__file__"


def _str(node: ast.AST) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    raise Unresolved


def _callee(node: ast.Call) -> str:
    """'Path', 'os.path.join', ... for a call's function; '' when it is no plain dotted name."""
    names, func = [], node.func
    while isinstance(func, ast.Attribute):
        names.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return ""
    return ".".join([func.id, *reversed(names)])


def evaluate(node: ast.AST, file: PurePosixPath, env: dict[str, PurePosixPath]) -> PurePosixPath:
    """The path an expression builds, with `__file__` = `file` and module constants in `env`;
    `resolve()` is taken as the identity (the layouts evaluated here have no links)."""
    if isinstance(node, ast.Name) and node.id in env:
        return env[node.id]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        return evaluate(node.left, file, env) / _str(node.right)
    if isinstance(node, ast.Attribute) and node.attr == "parent":
        return evaluate(node.value, file, env).parent
    if (
        isinstance(node, ast.Subscript)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "parents"
        and isinstance(node.slice, ast.Constant)
        and type(node.slice.value) is int
    ):
        base = evaluate(node.value.value, file, env)
        if node.slice.value >= len(base.parents):
            raise Unresolved
        return base.parents[node.slice.value]
    if isinstance(node, ast.Call) and not node.keywords:
        name = _callee(node)
        last = name.rpartition(".")[2]
        if (last in _PATH_TYPES or name in {"os.fspath", "str"}) and len(node.args) == 1:
            arg = node.args[0]
            return file if _is_file_name(arg) else evaluate(arg, file, env)
        if name in {f"os.path.{f}" for f in _OS_PATH_SAME} and len(node.args) == 1:
            return file if _is_file_name(node.args[0]) else evaluate(node.args[0], file, env)
        if name == "os.path.dirname" and len(node.args) == 1:
            arg = node.args[0]
            return (file if _is_file_name(arg) else evaluate(arg, file, env)).parent
        if name == "os.path.join" and node.args:
            base = evaluate(node.args[0], file, env)
            return base.joinpath(*(_str(a) for a in node.args[1:]))
        if isinstance(node.func, ast.Attribute):
            method, owner = node.func.attr, node.func.value
            if method in {"resolve", "absolute"} and not node.args:
                return evaluate(owner, file, env)
            if method in {"with_name", "with_suffix"} and len(node.args) == 1:
                base = evaluate(owner, file, env)
                return getattr(base, method)(_str(node.args[0]))
            if method == "joinpath":
                return evaluate(owner, file, env).joinpath(*(_str(a) for a in node.args))
    raise Unresolved


def _mentions_file(node: ast.AST, env: dict[str, PurePosixPath]) -> bool:
    return any(
        _is_file_name(n) or (isinstance(n, ast.Name) and n.id in env) for n in ast.walk(node)
    )


def built_paths(tree: ast.Module, file: PurePosixPath) -> list[tuple[ast.expr, PurePosixPath]]:
    """Every outermost expression in `tree` that builds a path from `__file__` (directly or through
    a module constant), with the path it builds; the module's own file is left out."""
    env: dict[str, PurePosixPath] = {}
    for statement in tree.body:  # module constants, in order
        value, targets = None, []
        if isinstance(statement, ast.Assign):
            value, targets = statement.value, statement.targets
        elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
            value, targets = statement.value, [statement.target]
        if len(targets) == 1 and isinstance(targets[0], ast.Name):
            try:
                env[targets[0].id] = evaluate(value, file, env)
            except Unresolved:
                pass
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    values: dict[ast.AST, PurePosixPath] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.expr) and not isinstance(node, ast.Name):
            if _mentions_file(node, env):
                try:
                    values[node] = evaluate(node, file, env)
                except Unresolved:
                    pass
    return [
        (node, path)
        for node, path in values.items()
        if parents.get(node) not in values and path != file
    ]


@dataclass(frozen=True)
class Reference:
    where: str  # "router/learned_scorer.py:35"
    key: str  # "router/learned_scorer.py: Path(__file__).parent / ..."
    source: Path  # what it names in the checkout
    installed: PurePosixPath  # what it names in site-packages (under SITE)


UNRESOLVED = PurePosixPath("/unresolved")  # an expression that builds no path in one layout


def _position(node: ast.AST) -> tuple[int, int]:
    return node.lineno, node.col_offset


def references(layout: Layout) -> list[Reference]:
    found = []
    for folder in sorted(set(layout.packages.values())):
        for module in sorted(folder.glob("*.py")):
            rel = module.relative_to(ROOT).as_posix()
            text = module.read_text()
            tree = ast.parse(text, rel)
            installed_file = SITE / layout.installed_of(module)
            in_checkout = dict(built_paths(tree, PurePosixPath(module)))
            in_wheel = dict(built_paths(tree, installed_file))
            for node in sorted(in_checkout.keys() | in_wheel.keys(), key=_position):
                expression = ast.get_source_segment(text, node) or ast.dump(node)
                expression = " ".join(expression.split())
                found.append(
                    Reference(
                        where=f"{rel}:{node.lineno}",
                        key=f"{rel}: {expression}",
                        source=Path(in_checkout.get(node, UNRESOLVED)),
                        installed=in_wheel.get(node, UNRESOLVED),
                    )
                )
    return found


# ---------------------------------------------------------------------------------------------
# git


def _git(root: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["git", *args],
        cwd=root,
        input=stdin,
        capture_output=True,
        text=True,
    )


def git_checkout_reason(root: Path = ROOT) -> str | None:
    """None when `root` is the top of a git work tree; else why the git checks cannot run."""
    if shutil.which("git") is None:
        return "git is not installed"
    top = _git(root, "rev-parse", "--show-toplevel")
    if top.returncode != 0:
        return f"{root} is not a git checkout"
    if Path(top.stdout.strip()).resolve() != root.resolve():
        return f"{root} is inside the git work tree {top.stdout.strip()}, not its top"
    return None


def git_problems(root: Path, paths: list[Path]) -> dict[str, str]:
    """{path relative to root: what is wrong} for files a fresh clone would lack: missing here,
    not tracked (untracked or never added), or matched by the ignore rules. A folder must hold
    at least one tracked file."""
    rels = sorted({p.relative_to(root).as_posix() for p in paths})
    listed = _git(root, "--literal-pathspecs", "ls-files", "-z", "--", *rels)
    assert listed.returncode == 0, listed.stderr
    tracked = set(listed.stdout.split("\0")) - {""}
    ignored_run = _git(root, "check-ignore", "--no-index", "-z", "--stdin", stdin="\0".join(rels))
    assert ignored_run.returncode in (0, 1), ignored_run.stderr
    ignored = set(ignored_run.stdout.split("\0")) - {""}
    problems = {}
    for rel in rels:
        path = root / rel
        if not path.exists():
            problems[rel] = "missing from the checkout"
        elif path.is_dir():
            if not any(t.startswith(rel.rstrip("/") + "/") for t in tracked):
                problems[rel] = "folder holds no file tracked by git"
        elif rel not in tracked:
            problems[rel] = "not tracked by git: a fresh clone lacks it (git add it)"
        elif rel in ignored:
            problems[rel] = "matched by .gitignore (un-ignore it there)"
    return problems


def _require_git() -> None:
    reason = git_checkout_reason()
    if reason is not None:
        pytest.skip(f"needs a git checkout: {reason}")


# ---------------------------------------------------------------------------------------------
# the tests

LAYOUT = read_layout()
REFERENCES = references(LAYOUT)
GLOBS = [(package, g) for package, globs in LAYOUT.package_data.items() for g in globs]


def shipped_paths(layout: Layout = LAYOUT) -> set[Path]:
    """Every file or folder the package ships or names as shipped, in the checkout."""
    data = {p for package in layout.packages for p in layout.data_files(package)}
    built = {r.source for r in REFERENCES if ROOT in r.source.parents}
    return built | data | {ROOT / n for n in NAMED}


def test_discovery_finds_the_shipped_constants() -> None:
    """The scan sees the constants the issue names, so it is looking in the right places."""
    sources = {r.source.relative_to(ROOT).as_posix() for r in REFERENCES if r.source != UNRESOLVED}
    for expected in (
        "router/models/scorer-smollm2.onnx",  # learned_scorer.SHIPPED_MODEL
        "engine/overlays/smollm2-exits.safetensors",  # checkpoint.EMBEDDED_OVERLAY
        "ruyiflow/data",  # evaluation.prompts.DATA_DIR
        "ruyiflow/data/prompts-train.jsonl",  # ... TRAIN_PROMPTS = DATA_DIR / ...
        "ruyiflow/distill/seed_prompts.txt",  # distill.corpus.SEED_PROMPTS
        "kernels/cpu_gemv.c",  # kernels.cpu_gemv.SOURCE
    ):
        assert expected in sources, f"no module constant names {expected}: {sorted(sources)}"
    data = {p.relative_to(ROOT).as_posix() for pk in LAYOUT.packages for p in LAYOUT.data_files(pk)}
    for named in NAMED:
        assert named in sources | data, f"{named} is neither built from __file__ nor package data"


def test_every_shipped_path_is_tracked_and_not_ignored() -> None:
    _require_git()
    problems = git_problems(ROOT, sorted(shipped_paths()))
    assert not problems, "\n".join(f"{path}: {why}" for path, why in problems.items())


@pytest.mark.parametrize(("package", "glob"), GLOBS, ids=[f"{p}:{g}" for p, g in GLOBS])
def test_package_data_glob_matches_a_tracked_file(package: str, glob: str) -> None:
    _require_git()
    assert package in LAYOUT.packages or package == "*", f"package-data names {package}"
    folders = (
        sorted(set(LAYOUT.packages.values())) if package == "*" else [LAYOUT.packages[package]]
    )
    matched = sorted(p for folder in folders for p in folder.glob(glob) if p.is_file())
    assert matched, f"package-data {package}: {glob!r} matches nothing in {folders}"
    problems = git_problems(ROOT, matched)
    tracked = [p for p in matched if p.relative_to(ROOT).as_posix() not in problems]
    assert tracked, f"package-data {package}: {glob!r} matches no tracked file: {problems}"


@pytest.mark.parametrize(
    "reference",
    [
        pytest.param(
            r,
            marks=[pytest.mark.xfail(reason=KNOWN_BROKEN_IN_WHEEL[r.key], strict=True)]
            if r.key in KNOWN_BROKEN_IN_WHEEL
            else [],
            id=r.where,
        )
        for r in REFERENCES
    ],
)
def test_built_path_is_shipped_in_the_wheel(reference: Reference) -> None:
    """Installed, the expression names the same file the checkout has, and the wheel holds it."""
    where = f"{reference.key} (line {reference.where})"
    for layout, path in (("checkout", reference.source), ("wheel", reference.installed)):
        assert path != UNRESOLVED, f"{where}: builds no path in the {layout} layout"
    assert reference.source.exists(), f"{where}: {reference.source} does not exist"
    assert SITE in reference.installed.parents, f"{where}: leaves site-packages when installed"
    installed = reference.installed.relative_to(SITE)
    found = LAYOUT.source_of(installed)
    rel = reference.source.relative_to(ROOT)
    assert found is not None and found[1] == reference.source, (
        f"{where}: installed it names {installed}, which is not {rel} of the checkout"
    )
    assert LAYOUT.ships(installed), f"{where}: the wheel does not hold {installed}"


def test_known_broken_keys_are_current() -> None:
    """A marker above names an expression the source still has (else it is stale: drop it)."""
    keys = {r.key for r in REFERENCES}
    assert set(KNOWN_BROKEN_IN_WHEEL) <= keys, set(KNOWN_BROKEN_IN_WHEEL) - keys


# ---------------------------------------------------------------------------------------------
# the checks themselves, on small inputs


def test_git_problems_catches_untracked_and_ignored_files(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    (repo / "models").mkdir(parents=True)
    _git(repo, "init", "-q")
    (repo / ".gitignore").write_text("*.onnx\n!/models/kept.onnx\n")
    for name in ("kept.onnx", "untracked.onnx", "forced.onnx", "later.txt"):
        (repo / "models" / name).write_bytes(b"x")
    assert _git(repo, "add", ".gitignore", "models/kept.onnx").returncode == 0
    assert _git(repo, "add", "-f", "models/forced.onnx").returncode == 0
    paths = [repo / "models" / n for n in ("kept.onnx", "untracked.onnx", "forced.onnx")]
    problems = git_problems(repo, [*paths, repo / "models" / "later.txt", repo / "gone.bin"])
    assert set(problems) == {
        "models/untracked.onnx",  # present but ignored, so never added: a clone lacks it
        "models/forced.onnx",  # tracked, but the rules still match it
        "models/later.txt",  # present, not ignored, just never added
        "gone.bin",
    }, problems
    assert "not tracked" in problems["models/untracked.onnx"]
    assert "not tracked" in problems["models/later.txt"]
    assert ".gitignore" in problems["models/forced.onnx"]
    assert git_problems(repo, [repo / "models"]) == {}
    assert _git(repo, "add", "models/later.txt").returncode == 0
    assert git_problems(repo, [repo / "models" / "later.txt"]) == {}


def test_built_paths_reads_the_usual_spellings() -> None:
    source = textwrap.dedent(
        """
        import os
        from pathlib import Path
        HERE = Path(__file__).resolve().parent
        MODEL = HERE / "models" / "m.onnx"
        C = Path(__file__).with_name("k.c")
        UP = Path(__file__).parents[1] / "data" / "d.jsonl"
        OLD = os.path.join(os.path.dirname(__file__), "t.txt")
        NAME = "not a path"
        def f(name):
            print(__file__)
            return HERE.joinpath("sub", "x.bin"), HERE / name
        """
    )
    file = PurePosixPath("/s/pkg/sub/mod.py")
    got = {ast.unparse(node): str(path) for node, path in built_paths(ast.parse(source), file)}
    assert got == {
        "Path(__file__).resolve().parent": "/s/pkg/sub",
        "HERE / 'models' / 'm.onnx'": "/s/pkg/sub/models/m.onnx",
        "Path(__file__).with_name('k.c')": "/s/pkg/sub/k.c",
        "Path(__file__).parents[1] / 'data' / 'd.jsonl'": "/s/pkg/data/d.jsonl",
        "os.path.join(os.path.dirname(__file__), 't.txt')": "/s/pkg/sub/t.txt",
        "HERE.joinpath('sub', 'x.bin')": "/s/pkg/sub/sub/x.bin",
    }, got


def test_installed_layout_maps_folders_onto_subpackages() -> None:
    assert LAYOUT.installed_of(ROOT / "engine" / "overlays" / "x") == PurePosixPath(
        "ruyiflow/engine/overlays/x"
    )
    assert LAYOUT.installed_of(ROOT / "ruyiflow" / "data" / "x") == PurePosixPath("ruyiflow/data/x")
    assert LAYOUT.source_of(PurePosixPath("ruyiflow/router/models/m.onnx")) == (
        "ruyiflow.router.models",
        ROOT / "router" / "models" / "m.onnx",
    )
    assert LAYOUT.source_of(PurePosixPath("router/models/m.onnx")) is None
    assert LAYOUT.ships(PurePosixPath("ruyiflow/engine/engine.py"))
    assert not LAYOUT.ships(PurePosixPath("ruyiflow/ruyiflow/data/prompts-train.jsonl"))
