"""Serving: the Triton repository builder and its python-backend models (``triton_repo``), the Triton launcher
(``python -m sdconet.serve``), the client CLI (``python -m sdconet.client``; the client classes are
:mod:`sdconet.runtime.triton_client`), load generator and soak (``python -m sdconet.loadgen``) and the pre/post-processing
the Triton python models share. See docs/serving.md."""
