"""The quality-vs-compute plot (matplotlib, the `plot` extra): the lines, labels and legend it
draws, a PNG they show up in, and `--plot` refused up front, in one line, without matplotlib."""

from __future__ import annotations

import sys

import pytest

from ruyiflow import cli
from ruyiflow.engine.errors import InvalidRequest
from ruyiflow.evaluation.plot import line_plot, require_matplotlib, write_png

SERIES = [("up", [(1.0, 1.0), (0.4, 0.0)]), ("flat", [(0.4, 0.5), (1.0, 0.5)])]


def test_line_plot_draws_each_series_in_x_order_with_its_legend():
    fig = line_plot(SERIES, "compute", "agreement")
    (ax,) = fig.axes
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["up", "flat"]
    assert list(lines[0].get_xdata()) == [0.4, 1.0] and list(lines[0].get_ydata()) == [0.0, 1.0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["up", "flat"]
    assert ax.get_xlabel() == "compute" and ax.get_ylabel() == "agreement"
    assert ax.get_ylim() == (0.0, 1.0)


def test_png_shows_every_series_colour(tmp_path):
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread

    fig = line_plot(SERIES, "compute", "agreement", size_in=(6.0, 4.0))
    path = tmp_path / "plot.png"
    write_png(path, fig, dpi=100)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(path)[:, :, :3]  # [height, width, rgb] floats in 0..1, top row first
    assert img.shape == (400, 600, 3)
    box = fig.axes[0].get_window_extent()  # the plotting area in pixels, origin bottom-left
    inside = img[round(400 - box.y1) : round(400 - box.y0), round(box.x0) : round(box.x1)]
    for line in fig.axes[0].get_lines():
        near = (abs(inside - to_rgb(line.get_color())) < 0.02).all(axis=2)
        assert near.sum() > 200, line.get_label()  # a line across the plotting area


def test_plot_without_matplotlib_fails_up_front_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    with pytest.raises(InvalidRequest, match=r"pip install 'ruyiflow\[plot\]'"):
        require_matplotlib()
    # No model and no prompt file: an error about either would mean work began first.
    png = tmp_path / "x.png"
    argv = ["eval", "routing", "--prompts", str(tmp_path / "none.jsonl"), "--plot", str(png)]
    assert cli.main([*argv, "--model", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err
    assert err == (
        "ruyiflow eval: error: --plot needs matplotlib, which is not installed:"
        " pip install 'ruyiflow[plot]'\n"
    )
    assert not png.exists()
