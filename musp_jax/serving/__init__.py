"""Serving: a trained model loaded for the tools (image files -> features) and its
lowering to ONNX."""
