"""The PNG renderer: a valid file (signature, IHDR, CRCs, decodable rows) with the lines drawn."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from ruyiflow.evaluation.plot import BLACK, PALETTE, draw_text, line_plot, png_bytes, write_png


def decode_png(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    assert list(chunks)[0] == b"IHDR" and list(chunks)[-1] == b"IEND"
    width, height, depth, color, *_ = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, color) == (8, 2)
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, -1)
    assert (raw[:, 0] == 0).all()  # filter type 0 on every row
    return raw[:, 1:].reshape(height, width, 3)


def test_png_round_trip(tmp_path):
    img = np.zeros((3, 5, 3), np.uint8)
    img[1, 2] = (10, 20, 30)
    path = tmp_path / "x.png"
    write_png(path, img)
    assert (decode_png(path.read_bytes()) == img).all()
    with pytest.raises(ValueError):
        png_bytes(np.zeros((3, 5), np.uint8))


def test_line_plot_draws_axes_lines_and_legend():
    series = [("up", [(0.4, 0.0), (1.0, 1.0)]), ("flat", [(0.4, 0.5), (1.0, 0.5)])]
    img = decode_png(png_bytes(line_plot(series, "compute", "agreement", width=600, height=400)))
    assert img.shape == (400, 600, 3)
    assert (img[0, 0] == 255).all()  # white background
    colors = {tuple(c) for c in img.reshape(-1, 3)}
    assert tuple(PALETTE[0]) in colors and tuple(PALETTE[1]) in colors
    # the x axis: a black row at the bottom of the plotting area
    assert (img[400 - 52, 60:380] == BLACK).all()
    # the flat series at quality 0.5 lies on one row halfway up the plotting area
    flat_rows = np.where((img[:, 200] == PALETTE[1]).all(axis=1))[0]
    assert abs(flat_rows.mean() - (400 - 52 + 24) / 2) <= 1.5
    # the rising series crosses mid-x higher than it starts
    up = np.where((img[:, 60:390] == PALETTE[0]).all(axis=2))
    assert up[0].min() < up[0].max() - 200


def test_bitmap_font_marks_pixels():
    img = np.full((20, 40, 3), 255, np.uint8)
    draw_text(img, 0, 0, "1.0")
    dark = (img == 0).all(axis=2)
    assert dark.sum() > 10 and not dark[:, 36:].any()  # three glyphs of 8 px
