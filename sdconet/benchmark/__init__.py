"""Latency/throughput measurement of every backend (torch, ONNX Runtime, TensorRT, Triton) and result reporting."""
