"""ONNX export of early-exit branches and a torch-free ONNX Runtime branch runner.

- `engine.onnx.graph`: the ONNX graph of one branch, built with `onnx.helper` from a loaded
  FamilyModel's own tensors (needs torch).
- `engine.onnx.export`: `export_branch(loaded, exit, out_dir, quant=...)` writes graph, weights,
  tokenizer and `manifest.json` (needs torch).
- `engine.onnx.quantize`: int8 dynamic and int4 block-wise weight-only quantization.
- `engine.onnx.manifest`: the manifest format and its checks (torch-free).
- `engine.onnx.runtime`: `OnnxBranch`, running an export with numpy arrays (torch-free).

This package's `__init__` imports nothing, so `engine.onnx.runtime` stays torch-free.
"""
