"""Exports of a loaded model for other runtimes (ONNX Runtime today): graph building,
quantization, and the writer that checks the export against torch before it is kept. Serving
never imports this package; it reads exports through `ruyiflow.engine.onnx`."""
