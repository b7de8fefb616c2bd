"""topology.yaml `device` per node: cpu by default, cuda / cuda:N for the torch backend, errors
that name the field and its line."""

from __future__ import annotations

from pathlib import Path

import pytest

from ruyiflow.cluster.errors import TopologyError
from ruyiflow.cluster.topology_yaml import parse_topology

SHIPPED = (Path(__file__).resolve().parents[2] / "topology.yaml").read_text()
CLOUD = "    exits: [20, 24, 29]\n    backend: torch\n"


def with_cloud(extra: str) -> str:
    assert CLOUD in SHIPPED
    return SHIPPED.replace(CLOUD, CLOUD + extra)


def test_device_defaults_to_cpu_and_takes_cuda() -> None:
    topo = parse_topology(SHIPPED)
    assert {n.device for n in topo.nodes} == {"cpu"}
    for device in ("cuda", "cuda:1"):
        node = parse_topology(with_cloud(f"    device: {device}\n")).node("cloud-0")
        assert node.device == device


def test_bad_device_names_field_and_line() -> None:
    with pytest.raises(TopologyError, match=r"nodes\[1\]\.device.*cpu, cuda or cuda:N"):
        parse_topology(with_cloud("    device: gpu0\n"))


def test_device_is_a_torch_setting() -> None:
    text = with_cloud("    device: cuda\n").replace(
        "    device: cuda\n", "    device: cuda\n    providers: [CUDAExecutionProvider]\n"
    )
    text = text.replace(CLOUD, "    exits: [20, 24, 29]\n    backend: onnxruntime\n")
    with pytest.raises(TopologyError, match=r"device.*only valid with backend torch"):
        parse_topology(text)
