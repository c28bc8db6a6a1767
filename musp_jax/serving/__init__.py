"""Serving: a trained model loaded for the tools, and its lowering to ONNX."""
