"""Regenerate (or check) the checked-in Python stubs of `proto/ruyiflow.proto`.

    python scripts/gen_proto.py            # rewrite proto/ruyiflow_pb2{.py,.pyi,_grpc.py}
    python scripts/gen_proto.py --check    # exit 1 if the checked-in stubs are stale

protoc is run with `-I proto`, so the descriptor is registered as `ruyiflow.proto` (what
reflection clients see) and the generated gRPC module says `import ruyiflow_pb2`; that import is
rewritten to `from ruyiflow.proto import ruyiflow_pb2` so the stubs work as `ruyiflow.proto`.

Stubs depend on the grpcio-tools version that generated them (it stamps protobuf/grpc runtime
version checks into them), so `--check` compares against the installed tools' output.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROTO = ROOT / "proto" / "ruyiflow.proto"
PACKAGE = "ruyiflow.proto"


def generate(proto: Path, package: str = PACKAGE) -> dict[str, str]:
    """Run protoc on `proto` and return {file name: text} of the fixed-up stubs."""
    from grpc_tools import protoc  # heavy import, only when generating

    proto = proto.resolve()
    stem = proto.stem
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            "grpc_tools.protoc",
            f"-I{proto.parent}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(proto),
        ]
        if protoc.main(argv) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
        names = [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]
        files = {name: (Path(tmp) / name).read_text() for name in names}
    grpc_name = f"{stem}_pb2_grpc.py"
    files[grpc_name] = fix_import(files[grpc_name], stem, package)
    return files


def fix_import(text: str, stem: str, package: str) -> str:
    """Turn protoc's top-level `import <stem>_pb2 as ...` into a package-relative import."""
    pattern = re.compile(rf"^import {stem}_pb2 as ", re.MULTILINE)
    fixed, count = pattern.subn(f"from {package} import {stem}_pb2 as ", text)
    if count != 1:
        raise RuntimeError(f"expected one `import {stem}_pb2` in the gRPC stub, found {count}")
    return fixed


def stale_files(expected: dict[str, str], out_dir: Path) -> list[str]:
    """Names of stubs in `out_dir` that are missing or differ from `expected`."""
    stale = []
    for name, text in expected.items():
        path = out_dir / name
        if not path.is_file() or path.read_text() != text:
            stale.append(name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the stubs are stale")
    parser.add_argument("--proto", type=Path, default=DEFAULT_PROTO, help="the .proto file")
    parser.add_argument("--out", type=Path, default=None, help="stub dir (default: beside proto)")
    args = parser.parse_args(argv)
    out_dir = args.out or args.proto.resolve().parent

    expected = generate(args.proto)
    if args.check:
        stale = stale_files(expected, out_dir)
        for name in stale:
            path = out_dir / name
            old = path.read_text().splitlines() if path.is_file() else []
            diff = difflib.unified_diff(old, expected[name].splitlines(), name, "fresh", n=1)
            sys.stderr.write("\n".join(list(diff)[:40]) + "\n")
        if stale:
            sys.stderr.write(
                f"stale stubs in {out_dir}: {', '.join(stale)}; run `python scripts/gen_proto.py`\n"
            )
            return 1
        print(f"stubs in {out_dir} are up to date")
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in expected.items():
        (out_dir / name).write_text(text)
    print(f"wrote {', '.join(sorted(expected))} to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
