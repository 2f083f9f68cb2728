"""Custom kernels: the OpenAI Triton MSDA kernel (``msda_triton``), its TensorRT plugin (``trt_plugin``), the MSDA
plugin node of exported graphs with its ONNX Runtime binding (``msda_plugin``) and the fused CPU op (``cpu``).

Nothing is imported here: ``msda_triton`` needs the ``triton`` package and is imported on demand by
``sdconet.ops.msda`` (implementation ``triton``/``auto``); ``trt_plugin`` keeps TensorRT, ONNX and Triton imports
inside the functions that need them.
"""
