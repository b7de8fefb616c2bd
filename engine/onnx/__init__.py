"""The torch-free ONNX Runtime side of edge exports: what an onnxruntime node loads.

- `engine.onnx.manifest`: the manifest format and its checks (files, hashes, identity).
- `engine.onnx.runtime`: `OnnxBranch`, running one exported branch with numpy arrays.

Writing exports (graph building, int8/int4 weight-only MatMulNBits quantization) is
`ruyiflow.export`, which serving never imports. This package's `__init__` imports nothing, so
`engine.onnx.runtime` stays torch-free.
"""
