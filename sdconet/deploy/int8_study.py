"""Where INT8 loses accuracy: a per-layer-group sensitivity study of the exported graph (issue 21 item 1).

``python -m sdconet.deploy.int8_study --checkpoint CK [--images N]``

1. exports the checkpoint (pure + plugin-mode ONNX, :mod:`sdconet.deploy.exporter`), draws the calibration inputs
   of the shipped defaults (>= 256 training-split LR images, augmented crops when the split is smaller) and the
   held-out gate set (:func:`sdconet.deploy.accuracy.gate_dataset`);
2. calibrates once (ONNX Runtime's calibrator, activation ranges cached) and builds, for every layer group of
   :data:`sdconet.deploy.layer_groups.LAYER_GROUPS`, two Q/DQ graphs with the TensorRT path's quantization scheme
   (symmetric INT8 activations per tensor, symmetric per-channel INT8 weights, every Conv / MatMul / Gemm incl.
   attention's activation x activation MatMuls, MSDA sampling in float): **only** that group in INT8, and
   **float** = everything in INT8 but that group. Each is gated against FP32 (AP, AP75, agreement, MAC share);
3. measures the per-tensor activation error of the all-INT8 graph (relative L2 error of every compute node's output
   against FP32 on a few gate images, worst node per group);
4. optionally (``--modelopt``) separates ModelOpt's FP16 share of a drop from the INT8 share: the same PTQ with
   ``high_precision_dtype`` fp32 vs fp16 (the fp16 graph runs only where ONNX Runtime has the FP16 kernels; the
   reason is recorded otherwise);
5. optionally (``--paths``) runs ``export/build_engine.py``'s INT8 paths with the shipped defaults and records their
   gate results as the ``rows`` of the result.

Writes ``<out>.json`` (``{"rows", "groups", "activation_error", "fp16_share", "provenance"}``), ``<out>.md`` and
``<out>.png``. The ONNX Runtime Q/DQ graphs stand in for ModelOpt's in the group sweep (one calibration, seconds
per variant instead of a ModelOpt run each); the chosen exclusions are then measured with every real quantizer.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sdconet.utils.logging import get_logger, setup_logging

LOG = get_logger("sdconet.deploy.int8_study")  # also when run as __main__
DEFAULT_OUT = Path("benchmarks/results/int8_study")
# study row -> the export report's accuracy key; the QAT row (our fake-quant Q/DQ export, the graph ModelOpt's PTQ
# also writes, gated against the FP32 checkpoint the QAT started from) comes from the QAT export's report
PATH_KEYS = {"modelopt-ptq": "onnxruntime_int8-qdq", "modelopt-qat": "onnxruntime_int8-qat",
             "onnxruntime": "onnxruntime_int8", "openvino": "openvino_int8"}
QAT_KEY = PATH_KEYS["modelopt-qat"]


def qdq_variant(source: Path, output: Path, reader_images: np.ndarray, cache: Path, *,
                quantize: Sequence[str] | None = None, exclude: Sequence[str] = (),
                calibration_method: str = "minmax") -> Path:
    """A Q/DQ graph of ``source`` with the TensorRT path's scheme; ``quantize`` limits the quantized nodes (None =
    every compute node), ``exclude`` keeps nodes in float. The first call calibrates and writes ``cache``; later
    calls reuse its ranges."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._iter = iter(range(reader_images.shape[0]))

        def get_next(self):
            index = next(self._iter, None)
            return None if index is None else {"images": reader_images[index:index + 1]}

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    quantize_static(str(source), str(output), _Reader(), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["Conv", "MatMul", "Gemm"], per_channel=True, reduce_range=False,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    nodes_to_quantize=list(quantize) if quantize is not None else None,
                    nodes_to_exclude=list(exclude), calibrate_method=methods[calibration_method],
                    calibration_cache_path=str(cache),
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                   "CalibTensorRangeSymmetric": True})
    return output


def activation_errors(fp32_path: Path, int8_path: Path, images: np.ndarray, nodes: Sequence[str]) -> dict[str, float]:
    """Relative L2 error ``|int8 - fp32| / |fp32|`` of each node's first output over ``images``."""
    import onnx
    import onnxruntime as ort

    outputs: dict[str, dict[str, np.ndarray]] = {}
    for label, path in (("fp32", fp32_path), ("int8", int8_path)):
        model = onnx.load(str(path))
        by_name = {node.name: node.output[0] for node in model.graph.node}
        wanted = [by_name[n] for n in nodes if n in by_name]
        existing = {o.name for o in model.graph.output}
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in wanted if t not in existing)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        collected: dict[str, list[np.ndarray]] = {t: [] for t in wanted}
        for i in range(images.shape[0]):
            for t, value in zip(wanted, session.run(wanted, {"images": images[i:i + 1]})):
                collected[t].append(np.asarray(value, dtype=np.float64).ravel())
        outputs[label] = {n: np.concatenate(collected[by_name[n]]) for n in nodes if n in by_name}
    errors = {}
    for name, ref in outputs["fp32"].items():
        cand = outputs["int8"].get(name)
        if cand is not None and cand.shape == ref.shape:
            errors[name] = float(np.linalg.norm(cand - ref) / max(np.linalg.norm(ref), 1e-12))
    return errors


def _gate_row(gate: dict) -> dict:
    keys = ("AP", "AP50", "AP75", "ap_drop_points", "ap50_drop_points", "agreement", "int8_mac_fraction", "passed")
    return {k: gate.get(k) for k in keys}


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    import onnx

    from sdconet.deploy import layer_groups, quantize
    from sdconet.deploy.accuracy import accuracy_gate, gate_dataset, reference_results
    from sdconet.deploy.exporter import MSDA_EXCLUDE_PATTERN, ExportOptions, Exporter
    from sdconet.engine.checkpoint import load_model_weights, resolve_checkpoint
    from sdconet.runtime.onnxruntime_runner import OnnxRuntimeRunner

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    checkpoint = resolve_checkpoint(args.checkpoint)
    cfg, _, _ = load_model_weights(checkpoint)
    pure = work / "study.onnx"
    if not pure.is_file():
        Exporter(ExportOptions(checkpoint=str(checkpoint), out=str(work), name="study", imgsz=args.imgsz)).run()
    timings["export_s"] = time.perf_counter() - start

    from sdconet.data import build_dataset

    train_set = build_dataset(cfg.data, "train", cfg.model.upscale, train=False)
    calib = quantize.calibration_images(train_set, args.calib_images, args.imgsz, seed=0)
    gate_set = gate_dataset(cfg.data, cfg.model.upscale, images=args.images)
    LOG.info("study: %d calibration inputs, %d held-out gate images", calib.shape[0], len(gate_set))
    model = onnx.load(str(pure))
    compute = [n.name for n in model.graph.node if n.op_type in layer_groups.COMPUTE_OPS
               and not re.fullmatch(MSDA_EXCLUDE_PATTERN, n.name)]
    msda = [n.name for n in model.graph.node if re.fullmatch(MSDA_EXCLUDE_PATTERN, n.name)]
    groups = layer_groups.node_groups(compute)
    macs = layer_groups.compute_macs(model)
    total_macs = sum(macs.values())

    def gate_of(path: Path, reference: dict, runner_fp32) -> dict:
        with OnnxRuntimeRunner(path, providers=["CPUExecutionProvider"]) as runner:
            return accuracy_gate(runner_fp32, runner, gate_set, imgsz=args.imgsz, reference=reference,
                                 macs=layer_groups.int8_mac_fraction(path, macs), target="int8-qdq")

    cache = work / f"ranges_{args.calibration_method}.json"
    results: list[dict] = []
    with OnnxRuntimeRunner(pure, providers=["CPUExecutionProvider"]) as fp32:
        t0 = time.perf_counter()
        reference = reference_results(fp32, gate_set, args.imgsz)
        timings["fp32_eval_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        everything = qdq_variant(pure, work / "all.onnx", calib, cache, exclude=msda,
                                 calibration_method=args.calibration_method)
        timings["calibration_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        full = gate_of(everything, reference, fp32)
        timings["variant_eval_s"] = time.perf_counter() - t0
        LOG.info("all INT8: AP drop %.2f, agreement %.3f", full["ap_drop_points"], full["agreement"] or 0)
        selected = [g for g in groups if not args.groups or any(re.fullmatch(p, g) for p in args.groups)]
        for group in selected:
            nodes = groups[group]
            share = sum(macs.get(n, 0) for n in nodes) / total_macs
            row = {"group": group, "nodes": len(nodes), "mac_share": round(share, 4)}
            only = qdq_variant(pure, work / "only.onnx", calib, cache, quantize=nodes, exclude=msda,
                               calibration_method=args.calibration_method)
            row["int8_only"] = _gate_row(gate_of(only, reference, fp32))
            floated = qdq_variant(pure, work / "float.onnx", calib, cache, exclude=[*msda, *nodes],
                                  calibration_method=args.calibration_method)
            row["float_only"] = _gate_row(gate_of(floated, reference, fp32))
            # the figures the issue's table names: the group alone in INT8
            row |= {k: row["int8_only"][k] for k in ("AP", "AP75", "agreement", "ap_drop_points")}
            row["recovered_points"] = round(full["ap_drop_points"] - row["float_only"]["ap_drop_points"], 3)
            LOG.info("%-40s int8-only: drop %+.2f agr %.3f | float: drop %+.2f agr %.3f", group,
                     row["int8_only"]["ap_drop_points"], row["int8_only"]["agreement"] or 0,
                     row["float_only"]["ap_drop_points"], row["float_only"]["agreement"] or 0)
            results.append(row)
        exclusion_sets = []
        for name, patterns in (args.float_set or []):
            # a candidate exclusion set: these groups in float, every other compute node INT8
            chosen = [g for g in groups if any(re.fullmatch(p, g) for p in patterns)]
            kept = [n for g in chosen for n in groups[g]]
            variant = qdq_variant(pure, work / "float_set.onnx", calib, cache, exclude=[*msda, *kept],
                                  calibration_method=args.calibration_method)
            gate = _gate_row(gate_of(variant, reference, fp32))
            exclusion_sets.append({"name": name, "float_groups": chosen, "kept_nodes": len(kept), **gate})
            LOG.info("float set %-24s AP drop %+.2f, agreement %.3f, int8 MAC share %.3f", name,
                     gate["ap_drop_points"], gate["agreement"] or 0, gate["int8_mac_fraction"])
        t0 = time.perf_counter()
        errors = activation_errors(pure, everything, calib[:args.error_images], compute)
        timings["activation_error_s"] = time.perf_counter() - t0
    per_group_error = []
    for group, nodes in groups.items():
        values = {n: errors[n] for n in nodes if n in errors}
        if values:
            worst = max(values, key=values.get)
            per_group_error.append({"group": group, "max_rel_error": round(values[worst], 5), "worst_node": worst,
                                    "mean_rel_error": round(float(np.mean(list(values.values()))), 5)})
    study = {"checkpoint": str(checkpoint), "imgsz": args.imgsz, "gate_images": len(gate_set),
             "calibration_images": int(calib.shape[0]), "calibration_method": args.calibration_method,
             "scheme": "ONNX Runtime QDQ: symmetric int8 activations per tensor, symmetric per-channel int8 weights, "
                       "Conv/MatMul/Gemm incl. activation x activation MatMuls, MSDA sampling float",
             "fp32": reference["ap"], "all_int8": _gate_row(full), "groups": results,
             "exclusion_sets": exclusion_sets,
             "activation_error": sorted(per_group_error, key=lambda r: -r["max_rel_error"]),
             "timings_s": {k: round(v, 1) for k, v in timings.items()}}
    if args.modelopt:
        study["fp16_share"] = fp16_share(pure, calib, gate_set, args, reference, macs)
    return study


def fp16_share(pure: Path, calib: np.ndarray, gate_set, args, reference: dict, macs: dict) -> dict:
    """ModelOpt PTQ of the shipped exclusions with high_precision_dtype fp32 vs fp16, both gated where they run."""
    from sdconet.deploy import layer_groups, quantize
    from sdconet.deploy.accuracy import accuracy_gate
    from sdconet.deploy.exporter import DEFAULT_INT8_EXCLUDE, DEFAULT_INT8_OP_TYPES, MSDA_EXCLUDE_PATTERN
    from sdconet.runtime.onnxruntime_runner import OnnxRuntimeRunner

    reason = quantize.modelopt_unavailable_reason()
    if reason:
        return {"skipped": reason}
    work = Path(args.work_dir)
    calib_path = quantize.write_calibration_data(calib, work / "calib.npz")
    out: dict[str, Any] = {"exclude": [MSDA_EXCLUDE_PATTERN, *DEFAULT_INT8_EXCLUDE],
                           "op_types": list(DEFAULT_INT8_OP_TYPES)}
    with OnnxRuntimeRunner(pure, providers=["CPUExecutionProvider"]) as fp32:
        for dtype in ("fp32", "fp16"):
            path = work / f"modelopt_{dtype}.onnx"
            summary = quantize.quantize_int8(pure, path, calib_path, exclude_nodes=out["exclude"],
                                             op_types_to_quantize=DEFAULT_INT8_OP_TYPES, high_precision_dtype=dtype)
            try:
                with OnnxRuntimeRunner(path, providers=["CPUExecutionProvider"],
                                       class_names=fp32.class_names) as runner:
                    gate = accuracy_gate(fp32, runner, gate_set, imgsz=args.imgsz, reference=reference,
                                         macs=layer_groups.int8_mac_fraction(path, macs), target="int8-qdq")
                out[dtype] = _gate_row(gate) | {"seconds": summary["seconds"]}
            except Exception as err:  # noqa: BLE001 - an FP16 graph ONNX Runtime CPU cannot run: say so
                out[dtype] = {"skipped": f"ONNX Runtime CPU cannot run the {dtype} Q/DQ graph: "
                                         f"{str(err).splitlines()[0][:300]}"}
    return out


def path_rows(report: dict) -> list[dict]:
    """The ``rows`` of the study from an export report's accuracy gates. A QAT export's report gives only the
    ``modelopt-qat`` row: its ``onnxruntime_int8-qdq`` gate compares against the QAT weights' float twin, not the FP32
    checkpoint, so it is not the PTQ row."""
    rows = []
    calib = (report.get("int8") or {}).get("calibration_images")
    accuracy = report.get("accuracy") or {}
    is_qat = QAT_KEY in accuracy
    for path, key in PATH_KEYS.items():
        gate = accuracy.get(key)
        if gate is None or (is_qat and key != QAT_KEY):
            continue
        rows.append({"path": path, "ap_drop_points": gate.get("ap_drop_points"), "agreement": gate.get("agreement"),
                     "int8_mac_fraction": gate.get("int8_mac_fraction"), "AP": gate.get("AP"),
                     "AP75": gate.get("AP75"), "AP_fp32": gate.get("AP_fp32"), "AP75_fp32": gate.get("AP75_fp32"),
                     "ap50_drop_points": gate.get("ap50_drop_points"), "passed": gate.get("passed"),
                     "reasons": gate.get("reasons", []), "images": gate.get("images"),
                     "calibration_images": gate.get("calibration_images", calib),
                     "excluded": gate.get("excluded", [])})
    return rows


def write_outputs(study: dict, out: Path) -> None:
    from sdconet.utils.provenance import provenance

    out.parent.mkdir(parents=True, exist_ok=True)
    study["provenance"] = provenance()
    out.with_suffix(".json").write_text(json.dumps(study, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(render_markdown(study))
    plot(study, out.with_suffix(".png"))


def _fmt(value: Any, spec: str) -> str:
    """``format(value, spec)``, or "-" for a figure that does not exist (no detection to agree on, no AP)."""
    return "-" if value is None else format(value, spec)


def render_markdown(study: dict) -> str:
    cpu = study["provenance"]["cpu"]
    fp32, full = study["fp32"], study["all_int8"]
    lines = [f"# INT8 sensitivity study ({study['imgsz']} px, {study['gate_images']} held-out images, "
             f"{study['calibration_images']} calibration inputs, {study['calibration_method']})", "",
             f"CPU: {cpu.get('model')} ({', '.join(cpu.get('isa') or [])}). Scheme: {study['scheme']}.", "",
             f"FP32: AP {_fmt(fp32['AP'], '.4f')}, AP75 {_fmt(fp32['AP75'], '.4f')}. All INT8: AP drop "
             f"{_fmt(full['ap_drop_points'], '+.2f')} pt, agreement {_fmt(full['agreement'], '.3f')}.", ""]
    if study.get("rows"):
        lines += ["## The INT8 paths with the shipped defaults", "",
                  "| path | AP drop (pt) | AP50 drop (pt) | AP75 | agreement | int8 MAC share | calib | passed |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in study["rows"]:
            lines.append(f"| {r['path']} | {_fmt(r['ap_drop_points'], '+.2f')} | "
                         f"{_fmt(r['ap50_drop_points'], '+.2f')} | {_fmt(r['AP75'], '.4f')} "
                         f"(fp32 {_fmt(r['AP75_fp32'], '.4f')}) | {_fmt(r['agreement'], '.3f')} | "
                         f"{r['int8_mac_fraction']} | {r['calibration_images']} | {r['passed']} |")
        lines.append("")
    lines += ["## Groups (sorted by the AP drop of the group alone in INT8)", "",
              "| group | MAC share | only this group INT8: AP drop / AP75 / agreement | all but this group INT8: AP "
              "drop / agreement | recovered (pt) |", "|---|---|---|---|---|"]
    for r in sorted(study["groups"], key=lambda r: -(r["int8_only"]["ap_drop_points"] or 0.0)):
        o, f = r["int8_only"], r["float_only"]
        lines.append(f"| {r['group']} | {_fmt(r['mac_share'], '.3f')} | {_fmt(o['ap_drop_points'], '+.2f')} / "
                     f"{_fmt(o['AP75'], '.4f')} / {_fmt(o['agreement'], '.3f')} | "
                     f"{_fmt(f['ap_drop_points'], '+.2f')} / {_fmt(f['agreement'], '.3f')} | "
                     f"{_fmt(r['recovered_points'], '+.2f')} |")
    if study.get("exclusion_sets"):
        lines += ["", "## Candidate exclusion sets (these groups in float, everything else INT8)", "",
                  "| set | groups kept in float | AP drop (pt) | agreement | int8 MAC share |", "|---|---|---|---|---|"]
        for r in study["exclusion_sets"]:
            lines.append(f"| {r['name']} | {', '.join(r['float_groups'])} | {_fmt(r['ap_drop_points'], '+.2f')} | "
                         f"{_fmt(r['agreement'], '.3f')} | {_fmt(r['int8_mac_fraction'], '.3f')} |")
    lines += ["", "## Activation error of the all-INT8 graph (worst compute node per group)", "",
              "Relative L2 error of each node's output against FP32, position by position. After the saliency "
              "token filter and the query selection (deformable encoder, proposal head, decoder) the tokens are "
              "ranked per run, so INT8 can reorder them and these rows measure the reordering as much as the "
              "rounding; the Swin stages, neck and saliency head rows are rounding only.", "",
              "| group | max rel. L2 error | mean | worst node |", "|---|---|---|---|"]
    for r in study["activation_error"][:15]:
        lines.append(f"| {r['group']} | {_fmt(r['max_rel_error'], '.4f')} | {_fmt(r['mean_rel_error'], '.4f')} | "
                     f"`{r['worst_node']}` |")
    share = study.get("fp16_share")
    if share:
        lines += ["", "## FP16 vs INT8 share (ModelOpt, shipped exclusions)", ""]
        for dtype in ("fp32", "fp16"):
            entry = share.get(dtype, share)
            lines.append(f"- high_precision_dtype {dtype}: " + (
                entry["skipped"] if "skipped" in entry else
                f"AP drop {_fmt(entry['ap_drop_points'], '+.2f')} pt, agreement {_fmt(entry['agreement'], '.3f')}"))
    lines += ["", f"Timings (s): {study['timings_s']}", ""]
    return "\n".join(lines)


def plot(study: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(study["groups"], key=lambda r: r["int8_only"]["ap_drop_points"])
    names = [r["group"] for r in rows]
    y = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.28 * len(rows) + 1.5), sharey=True)
    axes[0].barh(y - 0.2, [r["int8_only"]["ap_drop_points"] for r in rows], 0.4, label="only this group INT8")
    axes[0].barh(y + 0.2, [r["recovered_points"] for r in rows], 0.4, label="recovered by keeping it float")
    axes[0].set_xlabel("AP@[.5:.95] points (drop / recovered)")
    axes[0].axvline(0, color="k", lw=0.5)
    axes[0].legend(loc="lower right", fontsize=7)
    axes[1].barh(y - 0.2, [r["int8_only"]["agreement"] or 0 for r in rows], 0.4, label="only this group INT8")
    axes[1].barh(y + 0.2, [r["float_only"]["agreement"] or 0 for r in rows], 0.4, label="all but this group INT8")
    axes[1].axvline(0.95, color="r", lw=0.8, ls="--")
    axes[1].set_xlabel("detection agreement (IoU >= 0.9)")
    axes[1].set_xlim(0, 1.0)
    axes[1].legend(loc="lower left", fontsize=7)
    axes[0].set_yticks(y, names, fontsize=7)
    fig.suptitle(f"INT8 sensitivity per layer group ({study['gate_images']} held-out images)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _float_set(text: str) -> tuple[str, list[str]]:
    name, sep, patterns = text.partition("=")
    if not sep or not name or not patterns:
        raise argparse.ArgumentTypeError(f"--float-set wants NAME=REGEX[,REGEX...], got {text!r}")
    return name, patterns.split(",")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdconet.deploy.int8_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="weights file or run directory")
    parser.add_argument("--images", type=int, default=200, help="held-out gate images (default 200)")
    parser.add_argument("--imgsz", type=int, default=None, help="LR input side (default: the training size)")
    parser.add_argument("--calib-images", type=int, default=None, help="calibration inputs (default: the shipped "
                                                                       "default, 256)")
    parser.add_argument("--calibration-method", choices=("minmax", "entropy", "percentile"), default="minmax")
    parser.add_argument("--groups", nargs="*", default=None, metavar="REGEX", help="only these groups")
    parser.add_argument("--float-set", action="append", type=_float_set, default=None, metavar="NAME=REGEX[,REGEX]",
                        help="also gate one candidate exclusion set: the groups matching the regexes in float, "
                             "the rest INT8 (repeatable)")
    parser.add_argument("--error-images", type=int, default=8, help="images for the per-tensor activation error")
    parser.add_argument("--modelopt", action="store_true", help="also ModelOpt fp32 vs fp16 high precision")
    parser.add_argument("--report", type=Path, action="append", default=None,
                        help="an export report (export/build_engine.py) whose INT8 gates become the study's rows; "
                             "repeat it for the QAT export's report (its modelopt-qat row)")
    parser.add_argument("--work-dir", default="runs/int8_study")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output stem (.json, .md, .png)")
    args = parser.parse_args(argv)
    setup_logging()
    from sdconet.deploy.quantize import DEFAULT_CALIB_IMAGES
    from sdconet.engine.checkpoint import load_model_weights, resolve_checkpoint
    from sdconet.config import training_image_size

    args.calib_images = args.calib_images or DEFAULT_CALIB_IMAGES
    if args.imgsz is None:
        cfg, _, _ = load_model_weights(resolve_checkpoint(args.checkpoint))
        args.imgsz = training_image_size(cfg) // cfg.model.upscale
    study = run_study(args)
    if args.report:
        study["rows"] = [row | {"report": str(path)} for path in args.report
                         for row in path_rows(json.loads(path.read_text()))]
    study.setdefault("rows", [])
    write_outputs(study, args.out)
    print(render_markdown(study))
    return 0


if __name__ == "__main__":
    sys.exit(main())
