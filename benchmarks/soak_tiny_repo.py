"""Build the tests' tiny served model (``tests/serving_fixtures.py``: random-init tiny SDCoNet, pure-ONNX MSDA, LR
128, ``cpu`` deployment, one thread per instance) into a Triton repository with the DEFAULT pixel limit (8192²), a
stand-in for the demo repository where no trained demo checkpoint exists. Its soak sends the oversize array of a
default deployment (201 MB).

    python benchmarks/soak_tiny_repo.py OUT_DIR      # then: python -m sdconet.loadgen --repo OUT_DIR/repo --soak-seconds ...
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main(argv: list[str] | None = None) -> int:
    import torch
    from serving_fixtures import CLASS_NAMES, IMGSZ, MAX_BATCH, SCORE_THRESHOLD

    from sdconet.config import load_config
    from sdconet.deploy.onnx_export import check_model, export_module, save_model, simplify
    from sdconet.engine.inference_graph import build_inference_graph
    from sdconet.serve.triton_repo import RepositoryOptions, build_repository

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(args[0])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    with warnings.catch_warnings():  # tracer notes about the model's static shapes
        warnings.simplefilter("ignore")
        graph = build_inference_graph(load_config("tiny"), None, msda_impl="gather", with_saliency=True)
        model = export_module(graph, torch.rand(1, 3, IMGSZ, IMGSZ), input_name="images",
                              output_names=graph.output_names)
        path = save_model(simplify(model), out / "sdconet_tiny.onnx")
    check_model(path)
    print(build_repository(out / "repo", onnx_path=path, backend="cpu", imgsz=IMGSZ, max_batch=MAX_BATCH,
                           class_names=CLASS_NAMES, score_threshold=SCORE_THRESHOLD,
                           options=RepositoryOptions(cpu_threads=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
