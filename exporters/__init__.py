"""Exporters: ONNX export and the onnxruntime runner (arrive with the deployment work)."""
