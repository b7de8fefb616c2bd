"""Quality vs compute per routing policy as a PNG, drawn with matplotlib (the optional `plot`
extra: `pip install 'ruyiflow[plot]'`).

matplotlib is imported only here and only when a plot is asked for; `require_matplotlib` lets a
command refuse `--plot` up front, before any expensive work, when it is not installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ruyiflow.engine.errors import InvalidRequest

if TYPE_CHECKING:
    from matplotlib.figure import Figure

INSTALL_HINT = "pip install 'ruyiflow[plot]'"
Series = tuple[str, Sequence[tuple[float, float]]]  # (policy name, [(compute, quality)])


def require_matplotlib() -> None:
    """Raise InvalidRequest (one line: how to install it) when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401  (the package itself: a cached submodule would hide it)
    except ImportError:
        raise InvalidRequest(
            f"--plot needs matplotlib, which is not installed: {INSTALL_HINT}"
        ) from None


def line_plot(
    series: Sequence[Series],
    x_label: str,
    y_label: str,
    y_range: tuple[float, float] = (0.0, 1.0),
    size_in: tuple[float, float] = (7.6, 4.8),
) -> Figure:
    """One line with markers per series (points joined in x order), legend beside the axes."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure on the Agg canvas: no pyplot global state, no display needed.
    fig = Figure(figsize=size_in, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, points in series:
        xs, ys = zip(*sorted(points), strict=True) if points else ((), ())
        # A one-point policy (always-shallowest, always-deepest) sits on others' lines: a
        # larger round marker drawn on top keeps it visible.
        alone = len(points) == 1
        ax.plot(
            xs,
            ys,
            marker="o" if alone else "s",
            markersize=8 if alone else 4,
            linewidth=1.5,
            label=name,
            zorder=3 if alone else 2,
            clip_on=False,  # points at quality 1.0 sit on the frame, drawn whole
        )
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_ylim(*y_range)
    ax.grid(True, color="0.88")
    if series:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize="small")
    return fig


def write_png(path: str | Path, fig: Figure, dpi: int = 100) -> None:
    fig.savefig(Path(path), format="png", dpi=dpi)
