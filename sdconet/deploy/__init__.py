"""Deployment: inference graph, ONNX export (plugin / pure MSDA), TensorRT op check, INT8 Q/DQ (ModelOpt), TensorRT
build + runtime, Triton repository, export report. The CLI is ``export/build_engine.py``; see docs/export.md.

Modules are imported on use (TensorRT, ModelOpt and onnxruntime-extensions are optional):
``inference_graph.InferenceGraph``, ``exporter.ExportOptions`` / ``run_export``, ``onnx_export``, ``msda_plugin``,
``op_support``, ``quantize``, ``tensorrt_build``, ``report``, ``triton_repo``. Runtimes (ONNX Runtime, TensorRT, ...)
live in ``sdconet.runtime``; ``trt_runtime`` re-exports ``TensorRTRunner`` for old imports.
"""
