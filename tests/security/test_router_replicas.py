"""`router.replicas`: `ruyiflow up` runs every router of one topology (each on its own ports,
supervised), clients and `ruyiflow query` take them all, and a stream whose router is SIGKILLed
mid-stream resumes on another with the same greedy tokens."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import pytest

from ruyiflow.cluster.errors import TopologyError
from ruyiflow.cluster.topology_yaml import parse_topology
from ruyiflow.cmd_up import children_of, health
from ruyiflow.local_cluster import free_ports
from ruyiflow.router.client import RouterClient
from ruyiflow.supervisor import port_holder
from tests.security.test_supervisor import TOPOLOGY as ONE_ROUTER
from tests.security.test_supervisor import start_up, wait_for

# test_supervisor's one-router cluster, with a second router
TOPOLOGY = (
    ONE_ROUTER
    + """  replicas:
    - {{listen: '127.0.0.1:{p[4]}', metrics: '127.0.0.1:{p[5]}', http: '127.0.0.1:{p[6]}'}}
"""
)
PROMPT = "Tell me about lighthouses."
OPTIONS = {"max_tokens": 24, "temperature": 0.0, "exit": 20}


def test_replicas_are_parsed_and_their_addresses_checked():
    ports = list(range(7700, 7707))
    topology = parse_topology(TOPOLOGY.format(p=ports), "t.yaml")
    assert topology.router.listens == ("127.0.0.1:7702", "127.0.0.1:7704")
    assert topology.router.replicas[0].http == "127.0.0.1:7706"
    with pytest.raises(TopologyError, match=r"router.replicas\[0\].metrics: address .* router"):
        parse_topology(TOPOLOGY.format(p=[*ports[:5], 7703, 7706]), "t.yaml")
    with pytest.raises(TopologyError, match="reserved for the routers"):
        parse_topology(TOPOLOGY.format(p=ports).replace("node-0", "router-1"), "t.yaml")


def test_up_runs_each_replica_on_its_own_ports(tmp_path):
    path = tmp_path / "topology.yaml"
    path.write_text(TOPOLOGY.format(p=list(range(7700, 7707))))
    (replica,) = [c for c in children_of(str(path)) if c.name == "router-1"]
    assert replica.addresses == {
        "router.replicas[0].listen": "127.0.0.1:7704",
        "router.replicas[0].metrics": "127.0.0.1:7705",
        "router.replicas[0].http": "127.0.0.1:7706",
    }
    assert replica.argv[-6:] == [
        *("--listen", "127.0.0.1:7704", "--metrics", "127.0.0.1:7705"),
        *("--http", "127.0.0.1:7706"),
    ]


def router_pid(address: str) -> int:
    return int(re.search(r"pid (\d+)", port_holder(int(address.rsplit(":", 1)[1]))).group(1))


@pytest.mark.slow  # ~30 s; the parts: the tests above and test_daemons' router failover
def test_a_stream_survives_the_sigkill_of_an_up_started_router(tmp_path):
    ports = free_ports(7)
    topology = tmp_path / "topology.yaml"
    topology.write_text(TOPOLOGY.format(p=ports))
    routers = [f"127.0.0.1:{ports[2]}", f"127.0.0.1:{ports[4]}"]
    up, log = start_up(topology)
    try:
        wait_for(lambda: "all healthy" in log.read_text() or up.poll() is not None, 180, "up")
        assert up.poll() is None, log.read_text()
        assert ",".join(routers) in log.read_text()  # up names every router
        probe = [sys.executable, "-m", "ruyiflow", "health", "node-0", "--topology", str(topology)]
        done = subprocess.run(probe, capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stdout) == (0, "node-0: SERVING\n"), done.stderr
        with RouterClient(routers, timeout=120) as client:
            reference = client.complete(PROMPT, **OPTIONS).token_ids
        assert len(reference) == OPTIONS["max_tokens"]
        ids: list[int] = []
        killed = None
        with RouterClient(routers, timeout=120) as client:
            for chunk in client.generate(PROMPT, **OPTIONS):
                assert chunk.token_offset == len(ids)  # none lost, none repeated
                ids.extend(chunk.token_ids)
                if len(ids) >= 5 and killed is None:
                    killed = client.address
                    subprocess.run(["kill", "-KILL", str(router_pid(killed))], check=True)
            assert client.address != killed
        assert ids == reference
        # up's supervisor brings the killed router back on its ports.
        wait_for(lambda: health(killed) == "SERVING", 60, "the killed router back")
        assert re.search(r"router(-1)? exited", log.read_text())
        query = [sys.executable, "-m", "ruyiflow", "query", "--topology", str(topology)]
        query += ["--json", "--exit", "20", "--max-tokens", "24", "--temperature", "0", PROMPT]
        answer = subprocess.run(query, capture_output=True, text=True, timeout=120, check=True)
        assert json.loads(answer.stdout)["token_ids"] == reference
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
    finally:
        if up.poll() is None:
            up.kill()
    for port in ports:
        assert port_holder(port) is None
