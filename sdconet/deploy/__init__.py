"""Deployment (the top export layer, docs/architecture.md): ONNX export (plugin / pure MSDA) and the plugin-node
graph surgery, TensorRT op check, INT8 Q/DQ (ModelOpt) and CPU INT8, TensorRT engine build, accuracy gate, export
report; the exporter's last step fills a Triton repository with :mod:`sdconet.serve.triton_repo`. The CLI is
``export/build_engine.py``; see docs/export.md.

Modules are imported on use (TensorRT, ModelOpt and onnxruntime-extensions are optional): ``exporter.ExportOptions``
/ ``run_export``, ``onnx_export``, ``msda_plugin``, ``op_support``, ``quantize``, ``cpu_quantize``, ``accuracy``,
``tensorrt_build``, ``report``. The deploy graph is :mod:`sdconet.engine.inference_graph`; runtimes (ONNX Runtime,
TensorRT, ...) live in ``sdconet.runtime``; ``trt_runtime`` re-exports ``TensorRTRunner`` for old imports.
"""
