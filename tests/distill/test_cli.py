"""`ruyiflow distill` end to end on a tiny model: train, then `--report` on the same out dir."""

from __future__ import annotations

import argparse
import json

import pytest

from ruyiflow import cmd_distill
from ruyiflow.engine.errors import InvalidRequest


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cmd_distill.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_distill_then_report(tiny_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--model", str(tiny_dir), "--exits", "1,2", "--out", str(out)]
    common += ["--prompts", str(prompts_file), "--max-new-tokens", "12", "--quiet"]
    args = parse(*common, "--steps", "8", "--rank", "2", "--tokens", "200", "--json")
    assert cmd_distill.run(args) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["steps"] == 8 and trained["num_train_tokens"] >= 200
    for name in ("overlay.safetensors", "checkpoint.pt", "corpus.json", "features.safetensors"):
        assert (out / name).is_file(), name
    assert [q["exit"] for q in trained["trained"]] == [1, 2, 3]
    assert trained["trained"][-1]["top1_agreement"] == 1.0

    assert cmd_distill.run(parse(*common, "--report", "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["overlay"] == str(out / "overlay.safetensors")
    assert report["trained"] == trained["trained"]  # same held-out answers, same overlay

    assert cmd_distill.run(parse(*common, "--report", "--overlay", "none")) == 0
    table = capsys.readouterr().out
    assert "overlay: none" in table and "ppl untrained" in table and "ppl trained" not in table

    # --resume at the same settings finds the run finished and only rewrites the overlay
    args = parse(*common, "--steps", "8", "--rank", "2", "--tokens", "200", "--resume")
    assert cmd_distill.run(args) == 0
    assert "8 steps in 0s this run" in capsys.readouterr().out


def test_bad_arguments(tmp_path):
    with pytest.raises(InvalidRequest, match="comma-separated"):
        cmd_distill.run(parse("--exits", "a,b", "--out", str(tmp_path)))
    with pytest.raises(InvalidRequest, match="--out"):
        cmd_distill.run(parse("--exits", "12"))


def test_registered_in_the_cli(capsys):
    from ruyiflow import cli

    assert cli.COMMANDS["distill"][0] == "ruyiflow.cmd_distill"
    assert cli.main(["distill", "--exits", "x", "--out", "o"]) == 2  # a clear error, not a trace
    assert "comma-separated" in capsys.readouterr().err
