"""Parameters and multiply-accumulates of SDCoNet, its ablations and the serial baseline.

``python -m sdconet.models.summary --config paper --imgsz 256 --json summary.json`` prints a table and writes JSON
(the cost figures and a ``provenance`` object, :mod:`sdconet.utils.provenance`).
:func:`model_cost` is the reusable function behind it (the benchmarks CLI calls it too).

Counting convention: ``torch.utils.flop_counter.FlopCounterMode`` on a batch of one LR image, MACs = FLOPs / 2,
reported x1e9 (GMACs). Attention runs through PyTorch's math SDPA backend while counting, because the fused CPU
kernels are invisible to the counter.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from sdconet.config import ConfigError, ModelConfig, load_config
from sdconet.models.sdconet import SDCoNet, SerialBaseline
from sdconet.utils.provenance import provenance

# The paper's Table (parallel vs serial); input size and counting convention are not stated there.
PAPER_GFLOPS = {"inference": 16.94, "serial_baseline": 88.22}
NOT_COUNTED = ("FlopCounterMode counts matrix products and convolutions only (mm, addmm, bmm, convolution, "
               "attention via the math backend). Not counted: element-wise ops, normalisation, softmax, activations, "
               "bilinear sampling and weighting inside multi-scale deformable attention (gather-based), top-k/sort, "
               "position encodings and attention-mask construction.")

# ablation name -> (description, ModelConfig transformation); all measured on the inference graph
ABLATIONS: dict[str, tuple[str, Callable[[ModelConfig], ModelConfig]]] = {
    "no_saliency": ("saliency filtering off (SR-only row of the paper's ablation)",
                    lambda c: dataclasses.replace(c, saliency=dataclasses.replace(c.saliency, enabled=False))),
    "no_sr": ("SR decoder not built (saliency-only row; same inference graph as SDCoNet)",
              lambda c: dataclasses.replace(c, sr=False)),
    "detection_only": ("no SR decoder, no saliency (plain DINO on the shared encoder)",
                       lambda c: dataclasses.replace(c, sr=False, saliency=dataclasses.replace(
                           c.saliency, enabled=False))),
}


def count_parameters(module: nn.Module | None) -> float:
    """Parameters in millions (0 for None)."""
    return 0.0 if module is None else sum(p.numel() for p in module.parameters()) / 1e6


@contextmanager
def _counting() -> Iterator[FlopCounterMode]:
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        yield counter


def count_gmacs(run: Callable[[], object], components: dict[str, nn.Module | None] | None = None
                ) -> dict[str, float]:
    """GMACs of ``run()`` (``total``) and of each named component's forward calls within it."""
    components = {name: m for name, m in (components or {}).items() if m is not None}
    spent = {name: 0 for name in components}
    handles = []
    with _counting() as counter:
        for name, module in components.items():
            start: list[int] = []

            def pre_hook(_module, _args, start=start):
                start.append(counter.get_total_flops())

            def post_hook(_module, _args, _out, name=name, start=start):
                spent[name] += counter.get_total_flops() - start.pop()

            handles += [module.register_forward_pre_hook(pre_hook), module.register_forward_hook(post_hook)]
        try:
            run()
        finally:
            for handle in handles:
                handle.remove()
    result = {"total": counter.get_total_flops() / 2e9}
    result.update({name: flops / 2e9 for name, flops in spent.items()})
    return result


def _image_size(imgsz: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(imgsz, int):
        return imgsz, imgsz
    if len(imgsz) != 2:
        raise ValueError(f"imgsz must be one int or (height, width), got {imgsz!r}")
    return int(imgsz[0]), int(imgsz[1])


def _frozen(model: nn.Module) -> nn.Module:
    # no parameter requires grad, so module hooks never touch autograd while counting
    return model.eval().requires_grad_(False)


def model_cost(cfg: ModelConfig, imgsz: int | Sequence[int] = 256, ablations: bool = True,
               serial_baseline: bool = True, progress: bool = False) -> dict:
    """Parameters (millions) and GMACs at an LR input of ``imgsz`` (int or (h, w)), batch 1.

    Returns a JSON-serialisable dict: ``params_m`` (encoder, neck, detector, saliency (part of the detector),
    sr_decoder, total_inference (without the SR decoder), total_training, serial_baseline), ``gmacs``
    (``inference``, ``training_forward`` (inference graph + SR decoder, no denoising queries), ``serial_baseline``
    and each ablation), ``gmacs_breakdown`` per component, ``encoder_tokens_per_layer``, ``neck_tokens``,
    ``paper_gflops`` and the counting notes.
    """
    height, width = _image_size(imgsz)
    torch.manual_seed(0)
    images = torch.rand(1, 3, height, width)
    steps = ["sdconet"] + (list(ABLATIONS) if ablations else []) + (["serial_baseline"] if serial_baseline else [])
    bar = tqdm(total=len(steps), desc="model cost", disable=not progress, leave=False)

    model = _frozen(SDCoNet(cfg))
    parts = {"encoder": model.encoder, "neck": model.neck, "saliency": model.detector.saliency,
             "sr_decoder": model.sr_decoder}
    inference = count_gmacs(lambda: model.infer(images), parts)
    training_out: dict = {}
    training = count_gmacs(lambda: training_out.update(model(images)), parts)
    spatial_shapes = training_out["spatial_shapes"].tolist()
    params = {name: count_parameters(module) for name, module in
              (("encoder", model.encoder), ("neck", model.neck), ("detector", model.detector),
               ("saliency", model.detector.saliency), ("sr_decoder", model.sr_decoder))}
    params["total_inference"] = params["encoder"] + params["neck"] + params["detector"]
    params["total_training"] = params["total_inference"] + params["sr_decoder"]

    def breakdown(counts: dict[str, float]) -> dict[str, float]:
        out = {name: counts.get(name, 0.0) for name in ("encoder", "neck", "saliency", "sr_decoder")}
        out["detector"] = counts["total"] - out["encoder"] - out["neck"] - out["sr_decoder"]
        return out

    gmacs = {"inference": inference["total"], "training_forward": training["total"]}
    result = {
        "imgsz": [height, width],
        "batch": 1,
        "params_m": params,
        "gmacs": gmacs,
        "gmacs_breakdown": {"inference": breakdown(inference), "training_forward": breakdown(training)},
        "ablations": {},
        "encoder_tokens_per_layer": [int(n) for n in training_out["encoder_tokens_per_layer"]],
        "neck_spatial_shapes": spatial_shapes,
        "neck_tokens": int(sum(h * w for h, w in spatial_shapes)),
        "paper_gflops": dict(PAPER_GFLOPS),
        "convention": "MACs = FlopCounterMode FLOPs / 2, x1e9, batch 1, LR input size imgsz",
        "not_counted": NOT_COUNTED,
    }
    del model
    bar.update()

    for name in steps[1:]:
        bar.set_postfix_str(name)
        if name == "serial_baseline":
            serial = _frozen(SerialBaseline(cfg))
            counts = count_gmacs(lambda: serial.infer(images), {"sr_network": serial.sr_network})
            gmacs["serial_baseline"] = counts["total"]
            result["gmacs_breakdown"]["serial_baseline"] = {
                "sr_network": counts["sr_network"], "detection_network": counts["total"] - counts["sr_network"]}
            params["serial_baseline"] = count_parameters(serial)
            del serial
        else:
            description, transform = ABLATIONS[name]
            ablated = _frozen(SDCoNet(transform(cfg)))
            gmacs[name] = count_gmacs(lambda: ablated.infer(images))["total"]
            result["ablations"][name] = description
            del ablated
        bar.update()
    bar.close()
    return result


def format_table(cost: dict, title: str = "") -> str:
    """Human-readable table of :func:`model_cost`'s result."""
    height, width = cost["imgsz"]
    heading = " ".join(part for part in ("SDCoNet cost", title) if part)
    lines = [f"{heading} at LR {height}x{width}, batch 1 (GMACs = FLOPs/2 x1e9)", ""]
    lines.append(f"{'parameters':<34}{'M':>10}")
    for name, value in cost["params_m"].items():
        lines.append(f"  {name:<32}{value:>10.2f}")
    lines += ["", f"{'graph':<34}{'GMACs':>10}{'paper GFLOPs':>16}"]
    for name, value in cost["gmacs"].items():
        paper = cost["paper_gflops"].get(name)
        lines.append(f"  {name:<32}{value:>10.2f}{'' if paper is None else f'{paper:>16.2f}'}")
    lines += ["", "inference breakdown (GMACs): " + ", ".join(
        f"{k} {v:.2f}" for k, v in cost["gmacs_breakdown"]["inference"].items())]
    if "serial_baseline" in cost["gmacs_breakdown"]:
        lines.append("serial baseline breakdown (GMACs): " + ", ".join(
            f"{k} {v:.2f}" for k, v in cost["gmacs_breakdown"]["serial_baseline"].items()))
    lines.append(f"neck tokens {cost['neck_tokens']}; encoder tokens per layer {cost['encoder_tokens_per_layer']}")
    for name, description in cost["ablations"].items():
        lines.append(f"  {name}: {description}")
    lines += ["", "paper: 16.94 vs 88.22 GFLOPs (input size and convention not stated; likely MACs at 256x256 LR)",
              "note: " + cost["not_counted"]]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="paper", help="preset name (paper, tiny) or YAML path")
    parser.add_argument("--imgsz", type=int, nargs="+", default=[256], metavar="N",
                        help="LR input size: one value (square) or height width (default 256)")
    parser.add_argument("--json", type=Path, default=None, help="write the result as JSON to this path")
    parser.add_argument("--no-ablations", action="store_true", help="skip the ablation variants")
    parser.add_argument("--no-serial", action="store_true", help="skip the serial baseline")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.saliency.enabled=false")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if len(args.imgsz) not in (1, 2) or min(args.imgsz) < 1:
        raise SystemExit(f"--imgsz takes one or two positive ints, got {args.imgsz}")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from err
    imgsz = args.imgsz[0] if len(args.imgsz) == 1 else tuple(args.imgsz)
    cost = model_cost(cfg.model, imgsz, ablations=not args.no_ablations, serial_baseline=not args.no_serial,
                      progress=True)
    cost["config"] = cfg.name
    print(format_table(cost, title=f"[{cfg.name}]"))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        # the file also says where it came from (command, commit, versions, CPU); the returned dict is the cost
        args.json.write_text(json.dumps(cost | {"provenance": provenance()}, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return cost


if __name__ == "__main__":
    main()
