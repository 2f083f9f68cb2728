"""Serving: Triton launcher (``python -m sdconet.serve``), clients (``python -m sdconet.client``), load generator
(``python -m sdconet.loadgen``) and the pre/post-processing the Triton python models share. See docs/serving.md."""
