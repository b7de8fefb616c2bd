"""`ruyiflow bench cluster --tls` is the one entry point of the mTLS benchmark (bench/tls.py)."""

from __future__ import annotations

import pytest

import ruyiflow.bench.tls as tls
from ruyiflow.cli import main


def test_bench_cluster_tls_runs_the_tls_benchmark(monkeypatch):
    seen = []
    monkeypatch.setattr(tls, "run_tls", lambda args: seen.append(args) or 0)
    argv = ["bench", "cluster", "--tls", "--tls-requests", "3", "--tls-handoffs", "2", "--json"]
    assert main(argv) == 0
    (args,) = seen
    assert (args.tls_requests, args.tls_handoffs, args.json) == (3, 2, True)


def test_tls_and_engine_are_separate_runs(monkeypatch, capsys):
    monkeypatch.setattr(tls, "run_tls", lambda args: pytest.fail("ran"))
    assert main(["bench", "cluster", "--tls", "--engine"]) == 2
    assert "separate runs" in capsys.readouterr().err


def test_there_is_no_second_name_for_it():
    with pytest.raises(SystemExit) as err:
        main(["bench", "tls"])
    assert err.value.code == 2
