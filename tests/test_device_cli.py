"""`--device` on the commands that load a model, and `bench gpu`, on a machine without CUDA: one
clear error line (exit 2), never a traceback; CUDA graphs asked on the CPU are refused."""

from __future__ import annotations

import pytest
import torch

from ruyiflow.cli import main

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--device", "cuda", "--prompt-ids", "1,2", "--max-tokens", "2"],
        ["models", "--device", "cuda:1"],
        ["bench", "engine", "--device", "cuda", "--skip-transformers"],
    ],
)
def test_cuda_without_cuda_is_one_error(capsys, argv) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: device 'cuda" in err[0], err
    assert "CPU-only build" in err[0] or "no CUDA device" in err[0]


def test_bench_gpu_refuses_a_machine_without_cuda(capsys) -> None:
    assert main(["bench", "gpu", "--skip-tests"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bench gpu: cannot run here: device 'cuda' asked"), err


def test_cuda_graphs_on_the_cpu_are_refused(capsys) -> None:
    argv = ["generate", "--cuda-graphs", "--prompt-ids", "1,2", "--max-tokens", "2"]
    assert main(argv) == 2
    assert "CUDA graphs need a CUDA device" in capsys.readouterr().err
