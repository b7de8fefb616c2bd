"""The `ruyiflow` command line as a user runs it (subprocesses)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from ruyiflow.engine.engine import Engine
from ruyiflow.engine.sampling import SamplingParams


def ruyiflow(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruyiflow", *args], capture_output=True, text=True, timeout=timeout
    )


def test_generate_json_with_prompt_ids_matches_engine(smollm2):
    result = ruyiflow(
        "generate", "--prompt-ids", "1,504,3458,282", "--max-tokens", "6", "--exit", "20", "--json"
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    expected = [
        e.token_id
        for e in Engine(smollm2).generate([1, 504, 3458, 282], SamplingParams(max_tokens=6), 20)
    ]
    assert out["prompt_token_ids"] == [1, 504, 3458, 282] and out["token_ids"] == expected
    assert out["exit"] == 20 and len(out["confidence"]) == len(expected)
    assert set(out["confidence"][0]) == {"max_prob", "margin", "entropy"}
    assert (
        out["text"] == smollm2.tokenizer.decode(expected, skip_special_tokens=True) or out["text"]
    )


def test_generate_streams_text_then_speed():
    result = ruyiflow("generate", "--max-tokens", "24", "What is the capital of France?")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "tokens/s" in result.stderr


def test_models_lists_branches():
    result = ruyiflow("models", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["family"] == "llama" and info["exits"] == [12, 16, 20, 24, 29]
    params = [b["parameters"] for b in info["branches"]]
    assert params == sorted(params) and params[-1] > 130_000_000
    assert len(info["fingerprint"]) == 24


def test_bad_input_is_a_clear_error():
    result = ruyiflow("generate", "--exit", "13", "--max-tokens", "2", "hi")
    assert result.returncode == 2 and "exit 13 is not an exit" in result.stderr
    result = ruyiflow("generate", "--model", "/nonexistent/model", "hi")
    assert result.returncode == 2 and "no such model" in result.stderr


@pytest.mark.slow
def test_up_demo_logs_routes_and_no_tracebacks(tmp_path):
    """`make up` into a log file: every demo answer followed by its route; nodes still loading
    are expected (no traceback, no ERROR); no progress-bar redraws (carriage returns)."""
    from ruyiflow.cmd_up import DEMO_PROMPTS
    from ruyiflow.local_cluster import write_topology

    topology = tmp_path / "topology.yaml"
    write_topology(topology)  # free loopback ports: other tests may be serving
    log = tmp_path / "up.log"
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "ruyiflow", "up", "--topology", str(topology), "--demo"]
            + ["--exit-after-demo"],
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    assert "Traceback" not in text and not re.search(r"\b(ERROR|CRITICAL)\b", text), text
    assert "\r" not in text and len(text.splitlines()) < 80, text
    lines = text.splitlines()
    asked = [i for i, line in enumerate(lines) if line.startswith(">>> ")]
    assert [lines[i][4:] for i in asked] == list(DEMO_PROMPTS), text
    for start, end in zip(asked, [*asked[1:], len(lines)], strict=True):
        answer = lines[start + 1 : end]
        assert any(line.startswith("route: difficulty") for line in answer), answer
        assert any(line.startswith("  span ") for line in answer), answer
