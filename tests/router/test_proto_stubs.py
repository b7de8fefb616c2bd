"""The checked-in stubs are current, `--check` catches stale ones, and they import as a package."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gen_proto.py"
STUBS = ("ruyiflow_pb2.py", "ruyiflow_pb2.pyi", "ruyiflow_pb2_grpc.py")


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--check", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_checked_in_stubs_are_current() -> None:
    result = run_check()
    assert result.returncode == 0, result.stderr


def test_check_fails_on_a_modified_copy(tmp_path: Path) -> None:
    for name in ("ruyiflow.proto", *STUBS):
        shutil.copy(ROOT / "proto" / name, tmp_path / name)
    copy = tmp_path / "ruyiflow.proto"
    assert run_check("--proto", str(copy)).returncode == 0
    text = copy.read_text()
    copy.write_text(text.replace("message Message {", "message Message {\n  string name = 99;", 1))
    result = run_check("--proto", str(copy))
    assert result.returncode == 1
    assert "stale stubs" in result.stderr and "ruyiflow_pb2.py" in result.stderr
    (tmp_path / "ruyiflow_pb2_grpc.py").unlink()
    copy.write_text(text)
    assert "ruyiflow_pb2_grpc.py" in run_check("--proto", str(copy)).stderr


def test_stubs_import_as_package() -> None:
    from ruyiflow.proto import ruyiflow_pb2 as pb
    from ruyiflow.proto import ruyiflow_pb2_grpc as pb_grpc

    grpc_source = (ROOT / "proto" / "ruyiflow_pb2_grpc.py").read_text()
    assert "from ruyiflow.proto import ruyiflow_pb2 as" in grpc_source
    router = pb.DESCRIPTOR.services_by_name["Router"]
    node = pb.DESCRIPTOR.services_by_name["Node"]
    assert pb.DESCRIPTOR.package == "ruyiflow.v1"
    assert set(router.methods_by_name) == {"Generate", "Route", "ListNodes"}
    assert {"Generate", "Resume", "Info", "Drain", "PushState", "AcceptState"} <= set(
        node.methods_by_name
    )
    resume = node.methods_by_name["Resume"]
    assert resume.client_streaming and resume.server_streaming
    assert hasattr(pb_grpc, "NodeStub") and hasattr(pb_grpc, "add_RouterServicer_to_server")


def test_presence_and_round_trip() -> None:
    from ruyiflow.proto import ruyiflow_pb2 as pb

    request = pb.GenerateRequest(request_id="r1", text="hi")
    assert not request.overrides.HasField("exit")
    request.overrides.exit = 0  # presence matters: exit 0 set is not "unset"
    assert request.overrides.HasField("exit")
    request.sampling.temperature = 0.0
    assert request.sampling.HasField("temperature")
    assert request.WhichOneof("prompt") == "text"
    again = pb.GenerateRequest.FromString(request.SerializeToString())
    assert again == request
