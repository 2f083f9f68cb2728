"""Regenerate tests/data/tiny_reference_outputs.json from a chosen commit's code (the seeded tiny run of
tests/test_model.py::_reference_run, no overrides: that commit's defaults).

The committed snapshot comes from bf1121a, the last commit before the fidelity switches (dd50eef) existed::

    git archive bf1121a sdconet | tar -x -C /tmp/pre_switch
    PYTHONPATH=/tmp/pre_switch python tests/data/make_tiny_reference.py tests/data/tiny_reference_outputs.json bf1121a

Self-contained on purpose: it must run against an old tree, so it imports only APIs that tree already had.
"""
import json
import sys

import torch
from sdconet.config import load_config
from sdconet.losses.criterion import SetCriterion
from sdconet.models import build_model


def targets() -> list[dict]:  # tests/test_model.py::_reference_targets
    return [{"labels": torch.tensor([1, 3, 2]), "size": torch.tensor([128, 128]),
             "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.1], [0.7, 0.6, 0.1, 0.2], [0.5, 0.5, 0.3, 0.3]])},
            {"labels": torch.tensor([0]), "size": torch.tensor([128, 128]),
             "boxes": torch.tensor([[0.25, 0.3, 0.2, 0.2]])}]


def main(out: str, commit: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_config("tiny")
    model = build_model(cfg.model)
    criterion = SetCriterion.from_config(cfg)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 64, 64, generator=g)
    images_hr = torch.rand(2, 3, 128, 128, generator=g)
    model.train()
    torch.manual_seed(2)  # denoising noise
    out_train = model(images, None, targets())
    losses = criterion(out_train, targets(), images_hr)
    model.eval()
    with torch.no_grad():
        inferred = model.infer(images)

    def flat(x: torch.Tensor) -> list[float]:
        return [round(v, 6) for v in x.detach().flatten().tolist()]

    record = {"recorded_at": f"{commit} (the code before the model-fidelity switches of issue 14; "
                             "tests/data/make_tiny_reference.py)",
              "losses": {k: round(float(v.detach()), 7) for k, v in losses.items()},
              "sr_sum": float(out_train["sr_image"].detach().sum()),
              "pred_logits": flat(out_train["pred_logits"]), "pred_boxes": flat(out_train["pred_boxes"]),
              "infer_boxes": flat(inferred["boxes"]), "infer_scores": flat(inferred["scores"]),
              "saliency": flat(inferred["saliency"])}
    with open(out, "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
