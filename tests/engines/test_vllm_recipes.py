"""deploy/vllm: every topology snippet loads as a topology whose engine node agrees with the
vLLM and SGLang commands deploy/vllm/README.md gives for it (served model name, port, a context
at least the node's max_context, the model's last layer as its exit)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from ruyiflow.cluster.topology import NodeSpec
from ruyiflow.cluster.topology_yaml import load_topology

RECIPES = Path(__file__).resolve().parents[2] / "deploy" / "vllm"
SNIPPETS = sorted(RECIPES.glob("topology-*.yaml"))
# The exit of an engine node: a converted branch's exit, else the model's last layer
# (research/moe.md: Hunyuan-A13B 32 layers, dots.llm1 62, JoyAI-LLM Flash 40).
EXITS = {
    "topology-ruyi-7b-e27.yaml": 27,
    "topology-hunyuan-a13b.yaml": 31,
    "topology-dots-llm1.yaml": 61,
    "topology-joyai-llm-flash.yaml": 39,
}
ENGINES = {"vllm": "vllm serve", "sglang": "python3 -m sglang.launch_server"}


def commands() -> list[tuple[str, dict[str, str]]]:
    """(engine, {flag: value}) for each engine command of the README's shell blocks."""
    text = (RECIPES / "README.md").read_text()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)  # continuation lines
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            engine = next((e for e, start in ENGINES.items() if line.startswith(start)), None)
            if engine is None:
                continue
            words = shlex.split(line.removeprefix(ENGINES[engine]))
            flags = {}
            for i, word in enumerate(words):
                if word.startswith("--"):
                    has_value = i + 1 < len(words) and not words[i + 1].startswith("--")
                    flags[word] = words[i + 1] if has_value else ""
            found.append((engine, flags))
    return found


def engine_node(path: Path) -> NodeSpec:
    topology = load_topology(path)
    (node,) = [n for n in topology.nodes if n.backend == "openai"]
    return node


def test_every_snippet_is_listed():
    assert [p.name for p in SNIPPETS] == sorted(EXITS)


@pytest.mark.parametrize("path", SNIPPETS, ids=lambda p: p.name)
def test_the_snippet_is_a_valid_topology_with_one_engine_node(path):
    topology = load_topology(path)
    node = engine_node(path)
    assert node.tier == "cloud" and node.exits == (EXITS[path.name],)
    assert node.tokenizer, "an engine node names its tokenizer, or `none`"
    if path.name == "topology-hunyuan-a13b.yaml":  # tiktoken only: served without one
        assert node.tokenizer == "none"
    # the router can send work there: some threshold names the node's model and exit
    targets = {(t.model or topology.router.model, t.exit) for t in topology.router.thresholds}
    assert (node.model, node.exits[0]) in targets
    assert any(n.tier == "edge" for n in topology.nodes)


@pytest.mark.parametrize("path", SNIPPETS, ids=lambda p: p.name)
def test_the_readme_commands_match_the_node(path):
    node = engine_node(path)
    port = str(urlsplit(node.base_url).port)
    mine = [(e, f) for e, f in commands() if f.get("--served-model-name") == node.served_model]
    assert {e for e, _ in mine} == set(ENGINES), f"a vLLM and an SGLang command for {path.name}"
    for engine, flags in mine:
        assert flags["--port"] == port
        assert flags["--host"] == "0.0.0.0"
        context = flags.get("--max-model-len") or flags.get("--context-length")
        assert context is not None and int(context) >= node.max_context, (engine, context)
        parallel = flags.get("--tensor-parallel-size") or flags.get("--tp-size")
        assert parallel is not None and int(parallel) >= 1
