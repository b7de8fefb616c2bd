"""A tiny line-plot renderer writing PNG (numpy raster + zlib + struct; no matplotlib).

`line_plot` draws axes with ticks and numeric labels, one coloured polyline with square markers
per series, and a legend (colour square + name) in a 3x5 bitmap font scaled 2x. `write_png`
encodes an RGB raster as an 8-bit truecolour PNG (filter 0 on every row).
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (225, 225, 225)
PALETTE = [
    (31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14),
    (148, 103, 189), (140, 86, 75), (227, 119, 194), (23, 190, 207), (188, 189, 34),
]  # fmt: skip
# 3x5 glyphs: five rows of 3 bits (octal digit per row, high bit = left column).
FONT = dict(
    zip(
        "0123456789.-+ =()/_:%ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "75557 26227 71747 71717 55711 74717 74757 71111 75757 75717 00002 00700 02720 00000 "
        "07070 24442 21112 11244 00007 02020 51245 25755 65656 34443 65556 74647 74644 34553 "
        "55755 72227 11152 55655 44447 57755 65555 25552 65644 25563 65655 34216 72222 55557 "
        "55552 55775 55255 55222 71247".split(),
        strict=True,
    )
)
SCALE = 2  # font pixels per glyph pixel
LEFT, RIGHT, TOP, BOTTOM = 56, 210, 24, 52  # margins around the plotting area


def draw_text(img: np.ndarray, x: int, y: int, text: str, color=BLACK) -> None:
    """Upper-case `text` with its top-left corner at (x, y); unknown characters are blanks."""
    for k, ch in enumerate(text.upper()):
        rows = FONT.get(ch, "00000")
        for r, digit in enumerate(rows):
            for c in range(3):
                if int(digit) >> (2 - c) & 1:
                    x0, y0 = x + (4 * k + c) * SCALE, y + r * SCALE
                    img[y0 : y0 + SCALE, x0 : x0 + SCALE] = color


def _fill(img: np.ndarray, x: int, y: int, half: int, color) -> None:
    h, w = img.shape[:2]
    img[max(0, y - half) : min(h, y + half + 1), max(0, x - half) : min(w, x + half + 1)] = color


def _segment(img: np.ndarray, a: tuple[int, int], b: tuple[int, int], color) -> None:
    steps = max(abs(b[0] - a[0]), abs(b[1] - a[1]), 1)
    for t in np.linspace(0.0, 1.0, steps + 1):
        _fill(img, round(a[0] + t * (b[0] - a[0])), round(a[1] + t * (b[1] - a[1])), 1, color)


def _ticks(lo: float, hi: float) -> list[float]:
    step = 0.1 if hi - lo <= 1.0 else 0.2 if hi - lo <= 2.0 else 0.5
    first = math.ceil(lo / step - 1e-9)
    return [round(k * step, 6) for k in range(first, int(math.floor(hi / step + 1e-9)) + 1)]


def line_plot(
    series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    x_label: str,
    y_label: str,
    width: int = 760,
    height: int = 480,
    y_range: tuple[float, float] = (0.0, 1.0),
) -> np.ndarray:
    """RGB raster [height, width, 3] uint8 of every series (points joined in x order)."""
    xs = [x for _, pts in series for x, _ in pts] or [0.0, 1.0]
    x_lo, x_hi = math.floor(min(xs) * 10) / 10, math.ceil(max(xs) * 10) / 10
    x_hi = x_hi if x_hi > x_lo else x_lo + 0.1
    y_lo, y_hi = y_range
    img = np.full((height, width, 3), WHITE, dtype=np.uint8)
    x0, x1, y0, y1 = LEFT, width - RIGHT, height - BOTTOM, TOP  # y grows downwards

    def px(x: float, y: float) -> tuple[int, int]:
        fx, fy = (x - x_lo) / (x_hi - x_lo), (min(max(y, y_lo), y_hi) - y_lo) / (y_hi - y_lo)
        return round(x0 + fx * (x1 - x0)), round(y0 - fy * (y0 - y1))

    for tx in _ticks(x_lo, x_hi):
        x, _ = px(tx, y_lo)
        img[y1:y0, x] = GREY
        img[y0 : y0 + 5, x] = BLACK
        draw_text(img, x - 6 * SCALE, y0 + 8, f"{tx:.1f}")
    for ty in _ticks(y_lo, y_hi):
        _, y = px(x_lo, ty)
        img[y, x0:x1] = GREY
        img[y, x0 - 5 : x0] = BLACK
        draw_text(img, x0 - 10 - 12 * SCALE, y - 2 * SCALE, f"{ty:.1f}")
    img[y1 : y0 + 1, x0] = BLACK
    img[y0, x0 : x1 + 1] = BLACK
    draw_text(img, x0, height - 16, x_label)
    draw_text(img, x0, 6, y_label)
    for k, (name, pts) in enumerate(series):
        color = PALETTE[k % len(PALETTE)]
        corners = [px(x, y) for x, y in sorted(pts)]
        for a, b in zip(corners, corners[1:], strict=False):
            _segment(img, a, b, color)
        for c in corners:
            _fill(img, c[0], c[1], 3 if len(corners) > 1 else 5, color)
        ly = y1 + 4 + 18 * k
        _fill(img, x1 + 20, ly + 4, 5, color)
        draw_text(img, x1 + 32, ly, name[:21], color)
    return img


def png_bytes(img: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of `img` [height, width, 3] uint8."""
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an [H, W, 3] uint8 raster, got {img.shape} {img.dtype}")
    height, width = img.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = np.concatenate([np.zeros((height, 1), np.uint8), img.reshape(height, -1)], axis=1)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
        + chunk(b"IEND", b"")
    )


def write_png(path: str | Path, img: np.ndarray) -> None:
    Path(path).write_bytes(png_bytes(img))
