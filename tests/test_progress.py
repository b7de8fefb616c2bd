"""Progress bars (ruyiflow.progress): a few whole lines into a file or a pipe however many updates
and however long the job, a live bar on a terminal, resumed runs timed on their own work; the
export bar `ruyiflow up` writes into its log is one of them."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
import tqdm.std

from ruyiflow.progress import LOG_INTERVAL_S, progress_bar


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    """tqdm's clock, moved by hand. It starts at the real time: tqdm's monitor thread compares
    the real time with the bar's last print, and must not see a bar printed long ago."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(tqdm.std, "time", fake)  # tqdm.std reads `time` when a bar is created
    return fake


def run_bar(stream: io.StringIO, clock: Clock, steps: int, seconds: float) -> None:
    with progress_bar(steps, "train", "step", file=stream) as bar:
        for step in range(steps):
            clock.now += seconds / steps
            bar.advance(loss=1.0 / (step + 1))


def test_a_log_gets_a_line_per_interval_not_per_update(clock):
    out = io.StringIO()
    minutes = 10
    run_bar(out, clock, steps=10_000, seconds=60 * minutes)
    lines = out.getvalue().splitlines()
    # the start, about one a minute, the end
    assert 2 <= len(lines) <= minutes + 3, lines
    assert "\r" not in out.getvalue() and out.getvalue().endswith("\n")
    assert lines[0].startswith("train:   0% 0/10000")
    last = lines[-1]  # the whole run's rate and the last postfix value
    assert last.startswith("train: 100% 10000/10000 [") and "16.67step/s, loss=0.0001]" in last
    assert "|" not in lines[-1]  # no bar graphics in a log


def test_a_short_job_into_a_pipe_writes_its_start_and_its_end():
    out = io.StringIO()
    with progress_bar(1000, "features", "tok", file=out) as bar:
        for done in range(0, 1001, 10):
            bar.advance_to(done)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("features: 100% 1000/1000"), lines


def test_a_terminal_gets_a_live_bar(clock):
    out = FakeTerminal()
    run_bar(out, clock, steps=1000, seconds=100)
    redraws = out.getvalue().count("\r")
    assert redraws > 100, out.getvalue()[-300:]  # at most every 0.1 s, not once a minute
    assert "100%|" in out.getvalue() and "loss=" in out.getvalue()


def test_a_resumed_run_is_timed_on_its_own_work(clock):
    out = io.StringIO()
    with progress_bar(100, "train", "step", initial=50, file=out) as bar:
        for step in range(51, 61):
            clock.now += 1.0
            bar.advance_to(step)
    last = out.getvalue().splitlines()[-1]
    assert "60/100 [00:10<00:40,  1.00step/s]" in last, last  # not 6 steps/s


def test_disabled_bar_writes_nothing():
    out = io.StringIO()
    with progress_bar(10, "x", disable=True, file=out) as bar:
        bar.advance(5, loss=1.0)
        bar.report("weights", 0.5)
    assert out.getvalue() == ""


def test_stage_reports_are_percent_with_the_stage(clock):
    out = io.StringIO()
    with progress_bar(100, "export", "%", file=out) as bar:
        bar.report("weights", 0.456)
        assert bar.n == 46
        clock.now += LOG_INTERVAL_S
        bar.report("tokenizer", 1.5)  # clamped
        assert bar.n == 100
    assert out.getvalue().splitlines()[1].endswith("stage=tokenizer]")


def test_an_export_writes_a_few_lines_into_up_s_log(tmp_path, monkeypatch, capsys, clock):
    """`ruyiflow up` makes missing exports with its stderr in a log file: ~1,000 progress
    callbacks used to be ~1,000 redraws there."""
    import ruyiflow.export.onnx_export as onnx_export
    from ruyiflow.onnx_exports import ensure_export

    def fake_export(model, exit_layer, out, quant=None, progress=None):
        for k in range(1000):
            clock.now += 0.05
            progress("weights", k / 1000)
        Path(out).mkdir()
        (Path(out) / "manifest.json").write_text('{"fingerprint": "abc"}')

    class Model:
        fingerprint = "abc"

    monkeypatch.setattr(onnx_export, "export_branch", fake_export)
    path = tmp_path / "exit-12"
    assert ensure_export(Model(), 12, path)
    err = capsys.readouterr().err  # not a terminal under pytest's capture
    assert 1 <= len(err.splitlines()) <= 3, err
    assert "[ruyiflow] exporting exit 12" in err and "\r" not in err
    assert not ensure_export(Model(), 12, path)  # current: nothing made, nothing written
    assert capsys.readouterr().err == ""
