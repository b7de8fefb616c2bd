"""Our GGUF reader and block decoders against the `gguf` package (the reference): the same
metadata, tensor table and bytes, float32 values equal bit for bit; corrupt files refused with a
ModelLoadError; a lazy checkpoint is not read to answer `key in tensors`."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize as reference_dequantize
from gguf.quants import quantize

from ruyiflow.engine.checkpoint import embedded_gguf_path
from ruyiflow.engine.errors import ModelLoadError
from ruyiflow.engine.fingerprint import SampledTensors
from ruyiflow.engine.loaders.gguf_file import GGUFFile
from ruyiflow.engine.loaders.gguf_loader import GGUFTensors, gguf_config
from ruyiflow.engine.loaders.gguf_quants import FAST, dequantize

Q = gguf.GGMLQuantizationType


def _reference_values(t) -> np.ndarray:
    return reference_dequantize(t.rows(), t.tensor_type).astype(np.float32).reshape(-1)


@pytest.fixture(scope="module")
def embedded() -> tuple[GGUFFile, gguf.GGUFReader]:
    path = embedded_gguf_path()
    return GGUFFile(path), gguf.GGUFReader(str(path))


def test_metadata_and_tensor_table_equal_the_gguf_package(embedded):
    ours, ref = embedded
    assert set(ours.metadata) == set(ref.fields) - {
        k
        for k in ref.fields
        if k.startswith("GGUF.")  # the reader's pseudo-fields (header)
    }
    for key, value in ours.metadata.items():
        expected = ref.fields[key].contents()
        assert value == pytest.approx(expected) if isinstance(value, float) else value == expected
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for mine, theirs in zip(ours.tensors, ref.tensors, strict=True):
        assert mine.shape == tuple(int(d) for d in theirs.shape)
        assert mine.tensor_type == theirs.tensor_type
        assert type(mine.data) is np.ndarray  # a plain view, not a memmap
        assert mine.data.tobytes() == np.asarray(theirs.data).tobytes()


def test_every_embedded_tensor_dequantizes_bit_for_bit(embedded):
    ours, _ = embedded
    kinds = {t.tensor_type.name for t in ours.tensors}
    assert {"Q4_1", "Q8_0", "F32"} <= kinds, kinds  # the fast paths this file exercises
    for t in ours.tensors:
        got, want = dequantize(t), _reference_values(t)
        assert got.dtype == np.float32 and got.shape == want.shape
        assert got.flags.writeable  # a view of the (read-only) mapped file would not be
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), t.name


@pytest.mark.parametrize("kind", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.F16, Q.BF16, Q.Q5_0])
def test_block_formats_equal_the_reference(tmp_path, kind):
    """Each fast path (and one type left to gguf.quants) on random data written by GGUFWriter;
    values span signs and magnitudes so every nibble and scale takes part."""
    rng = np.random.default_rng(int(kind))
    values = (rng.standard_normal((6, 64)) * rng.uniform(0.01, 4, (6, 1))).astype(np.float32)
    path = tmp_path / f"{kind.name}.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("w", quantize(values, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (t,) = GGUFFile(path).tensors
    assert t.shape == (64, 6) and (kind.name in FAST) == (kind.name in ("Q4_0", "Q4_1", "Q8_0"))
    got, want = dequantize(t), _reference_values(t)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.abs(got.reshape(6, 64) - values).max() < 0.6 * np.abs(values).max()


def _truncations(path: Path) -> list[bytes]:
    data = path.read_bytes()
    return [data[:n] for n in (0, 3, 8, 23, 200, 5000, len(data) // 2, len(data) - 1)]


def test_corrupt_files_are_refused(tmp_path, embedded):
    ours, _ = embedded
    small = tmp_path / "small.gguf"
    small.write_bytes(ours.path.read_bytes()[: 6 << 20])  # metadata whole, tensors cut off
    with pytest.raises(ModelLoadError, match="runs past the end"):
        GGUFFile(small)
    for i, cut in enumerate(_truncations(small)):
        bad = tmp_path / f"cut{i}.gguf"
        bad.write_bytes(cut)
        with pytest.raises(ModelLoadError, match=f"cut{i}.gguf"):
            GGUFFile(bad)
    header = small.read_bytes()[:24]
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + header[4:])
    with pytest.raises(ModelLoadError, match="bad magic"):
        GGUFFile(tmp_path / "magic.gguf")
    (tmp_path / "be.gguf").write_bytes(header[:4] + (3).to_bytes(4, "big") + header[8:])
    with pytest.raises(ModelLoadError, match="version 50331648 unsupported"):
        GGUFFile(tmp_path / "be.gguf")


def test_membership_does_not_read_the_tensor(embedded):
    ours, _ = embedded
    reads = []

    class Counting(GGUFTensors):
        def __getitem__(self, key):
            reads.append(key)
            return super().__getitem__(key)

    tensors = SampledTensors(Counting(ours, gguf_config(ours)))
    assert "model.embed_tokens.weight" in tensors and "nope" not in tensors
    assert reads == []
    assert tensors["model.norm.weight"].shape == (576,) and reads == ["model.norm.weight"]
