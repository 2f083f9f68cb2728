"""Custom kernels: the OpenAI Triton MSDA kernel (``msda_triton``) and its TensorRT plugin (``trt_plugin``).

Nothing is imported here: ``msda_triton`` needs the ``triton`` package and is imported on demand by
``sdconet.ops.msda`` (implementation ``triton``/``auto``); ``trt_plugin`` keeps TensorRT, ONNX and Triton imports
inside the functions that need them.
"""
