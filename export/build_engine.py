"""Export SDCoNet for deployment: ONNX (plugin / pure), INT8 Q/DQ, TensorRT engine, Triton repository, report.

Examples::

    python export/build_engine.py --fp16                                   # latest run's best checkpoint
    python export/build_engine.py --checkpoint runs/tiny --msda onnx --imgsz 256 --max-batch 4
    python export/build_engine.py --int8 --calib-images 64 --require-engine --plugin-lib libmyplugins.so

Every artifact goes to ``--out`` (default ``engines/``); docs/export.md describes them and the report keys.
Without TensorRT or a GPU the ONNX artifacts and the report are still written and the skipped steps are listed
(exit status 0 unless ``--require-engine``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdconet.deploy.exporter import (CPU_INT8_BACKENDS, DEFAULT_INT8_EXCLUDE, DEFAULT_INT8_OP_TYPES,  # noqa: E402
                                      MSDA_MODES, TRITON_BACKENDS,
                                      TRITON_CPU_PRECISIONS, TRITON_CPU_RUNTIMES, ExportError, ExportOptions,
                                      print_summary, run_export)
from sdconet.kernels.msda_plugin import sdconet_plugin_available  # noqa: E402
from sdconet.deploy.op_support import UnsupportedOpError  # noqa: E402
from sdconet.deploy.quantize import DEFAULT_CALIB_IMAGES, QuantizationError  # noqa: E402
from sdconet.serve.triton_repo import RepositoryError  # noqa: E402
from sdconet.engine.checkpoint import CheckpointError  # noqa: E402
from sdconet.serve.python_env import PythonEnvError  # noqa: E402
from sdconet.utils.logging import get_logger, setup_logging  # noqa: E402

LOG = get_logger("sdconet.export")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_argument_group("source")
    src.add_argument("--checkpoint", default=None,
                     help="weights file or run directory (default: best checkpoint of the latest run under --runs)")
    src.add_argument("--runs", default="runs", help="where train/run.py writes runs (default: runs)")
    graph = parser.add_argument_group("graph")
    graph.add_argument("--imgsz", type=int, default=256, help="fixed LR input side in pixels (default 256)")
    graph.add_argument("--max-batch", type=int, default=8, help="largest batch of the dynamic batch axis (default 8)")
    graph.add_argument("--opt-batch", type=int, default=1, help="batch TensorRT optimises for (default 1)")
    msda_choices = [m for m in MSDA_MODES if m != "sdconet" or sdconet_plugin_available()]
    graph.add_argument("--msda", choices=msda_choices, default="plugin",
                       help="MSDA as the TensorRT plugin node (plugin), pure ONNX gather sampling (onnx)"
                            + (", or our own plugin (sdconet)" if "sdconet" in msda_choices else ""))
    graph.add_argument("--plugin-version", type=int, choices=(1, 2), default=1,
                       help="MultiscaleDeformableAttnPlugin_TRT version: 1 (IPluginV2, TRT >= 8.4, JetPack 6) or "
                            "2 (IPluginV3, TRT >= 10.11)")
    graph.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17)")
    graph.add_argument("--with-saliency", dest="with_saliency", action="store_const", const=True, default=None,
                       help="add the finest-level saliency map output (default: whenever the model has saliency on)")
    graph.add_argument("--no-saliency", dest="with_saliency", action="store_const", const=False,
                       help="export boxes/scores/labels only")
    prec = parser.add_argument_group("precision")
    prec.add_argument("--fp16", action="store_true", help="FP16 engine (TRT 11: from a ModelOpt AutoCast FP16 ONNX)")
    prec.add_argument("--int8", action="store_true", help="INT8 by explicit Q/DQ (ModelOpt PTQ) + CPU AP comparison")
    prec.add_argument("--cpu-int8", action="append", choices=CPU_INT8_BACKENDS, default=[], metavar="BACKEND",
                      help="INT8 for a CPU runtime by its own quantizer (onnxruntime: quantize_static QDQ -> "
                           "<name>.cpu_int8.onnx; openvino: NNCF -> <name>.openvino_int8.xml), gated against FP32; "
                           "repeatable")
    prec.add_argument("--calib-images", type=int, default=DEFAULT_CALIB_IMAGES,
                      help=f"INT8 calibration inputs (default {DEFAULT_CALIB_IMAGES}; augmented crops of the training "
                           f"split when it has fewer images)")
    prec.add_argument("--calib-dir", default=None, metavar="DIR",
                      help="calibrate on your own images (LR pixels, as the network is fed) instead of the training "
                           "split")
    prec.add_argument("--calib-method", choices=["entropy", "max"], default="entropy",
                      help="ModelOpt calibration of the Q/DQ graph (default entropy; docs/export.md has both measured)")
    prec.add_argument("--int8-exclude", action="append", default=None, metavar="REGEX",
                      help="keep the Conv/MatMul/Gemm nodes whose name fully matches REGEX in float in every INT8 path "
                           f"(repeatable; replaces the defaults {list(DEFAULT_INT8_EXCLUDE)}; pass '' for none)")
    prec.add_argument("--int8-op-types", nargs="*", default=None, metavar="OP",
                      help=f"op types ModelOpt's Q/DQ graph quantizes (default {' '.join(DEFAULT_INT8_OP_TYPES)}; "
                           f"no value: ModelOpt's own default, which also quantizes residual Adds, LayerNorm and "
                           f"TopK inputs and costs accuracy here, docs/export.md)")
    prec.add_argument("--eval-images", type=int, default=None,
                      help="cap on the accuracy gate's images (default: all of the gate set)")
    prec.add_argument("--gate-count", type=int, default=200,
                      help="held-out synthetic images of the accuracy gate (default 200; a seed the training data "
                           "never used)")
    prec.add_argument("--gate-images", default=None, metavar="DIR", help="gate on your own held-out images ...")
    prec.add_argument("--gate-ann", default=None, metavar="FILE", help="... and their COCO JSON")
    prec.add_argument("--int8-high-precision", choices=["auto", "fp16", "fp32"], default="auto",
                      help="type of the layers INT8 leaves unquantized (ModelOpt --high_precision_dtype); auto = fp16 "
                           "when this machine's TensorRT is >= 11 (strongly typed), else fp32; pass fp16 when a CPU "
                           "host prepares the Q/DQ ONNX for a TensorRT 11 target")
    prec.add_argument("--modelopt-python", default=None,
                      help="interpreter with nvidia-modelopt[onnx] (default: $SDCONET_MODELOPT_PYTHON or "
                           ".venv-modelopt/bin/python)")
    trt = parser.add_argument_group("TensorRT")
    trt.add_argument("--plugin-lib", action="append", default=[], help="extra TensorRT plugin library (repeatable)")
    trt.add_argument("--workspace", type=float, default=4.0, help="builder workspace in GiB (default 4)")
    trt.add_argument("--timing-cache", default=None,
                     help="timing cache file (default <out>/timing_trt<version>_<gpu>.cache; a cache from another "
                          "TensorRT or GPU is replaced by a fresh one)")
    trt.add_argument("--require-engine", action="store_true", help="exit 1 when no engine could be built")
    trt.add_argument("--require-accuracy", action="store_true",
                     help="exit 1 when an FP16/INT8 engine fails the accuracy gate against FP32 (else it is reported)")
    out = parser.add_argument_group("output")
    out.add_argument("--out", default="engines", help="artifact folder (default engines/)")
    out.add_argument("--name", default=None, help="artifact file stem (default sdconet_<config>_<imgsz>)")
    out.add_argument("--triton-repo", default=None, help="also populate this Triton model repository")
    out.add_argument("--triton-backend", choices=TRITON_BACKENDS, default="auto",
                     help="detector deployment in the repository: trt (tensorrt_plan), onnx (onnxruntime_onnx, "
                          "NVIDIA's Triton container) or cpu (python backend + ONNX Runtime, runs with the Triton "
                          "bundled in nvidia-pytriton); auto = trt when an engine was built, else cpu")
    out.add_argument("--triton-cpu-runtime", choices=TRITON_CPU_RUNTIMES, default="auto",
                     help="runtime of the cpu deployment's detector: openvino (the plugin-mode ONNX with the fused "
                          "MSDA op, its library copied into the repository), onnxruntime (the pure ONNX); auto = "
                          "openvino when openvino and the fused kernel are available here, else onnxruntime")
    out.add_argument("--triton-cpu-precision", choices=TRITON_CPU_PRECISIONS, default="fp32",
                     help="precision of the cpu deployment's detector: bf16 = OpenVINO's hint (needs BF16 "
                          "hardware on the serving machine), int8 = the --cpu-int8 model of the runtime")
    out.add_argument("--triton-python-env", default="auto", metavar="auto|current|none|PATH",
                     help="environment of the repository's python models (EXECUTION_ENV_PATH): current = this "
                          "Python's (checked: numpy < 2), none = the server's own Python (NVIDIA's container), a "
                          "path that exists on the serving machine, or auto = none for trt/onnx, current for cpu")
    out.add_argument("--allow-failed-gate", action="store_true",
                     help="let the Triton repository serve a reduced-precision model whose accuracy gate failed "
                          "(recorded in its manifest)")
    out.add_argument("--seed", type=int, default=0, help="seed for the parity batch and calibration sampling")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    options = ExportOptions(checkpoint=args.checkpoint, runs_dir=args.runs, out=args.out, name=args.name,
                            imgsz=args.imgsz, max_batch=args.max_batch, opt_batch=args.opt_batch, msda=args.msda,
                            plugin_version=args.plugin_version, opset=args.opset, with_saliency=args.with_saliency,
                            fp16=args.fp16, int8=args.int8, cpu_int8=tuple(args.cpu_int8),
                            calib_images=args.calib_images, calib_dir=args.calib_dir,
                            calib_method=args.calib_method,
                            int8_exclude=(DEFAULT_INT8_EXCLUDE if args.int8_exclude is None
                                          else tuple(p for p in args.int8_exclude if p)),
                            int8_op_types=(DEFAULT_INT8_OP_TYPES if args.int8_op_types is None
                                           else tuple(args.int8_op_types)),
                            gate_count=args.gate_count, gate_images=args.gate_images, gate_ann=args.gate_ann,
                            allow_failed_gate=args.allow_failed_gate,
                            eval_images=args.eval_images, modelopt_python=args.modelopt_python,
                            plugin_libs=tuple(args.plugin_lib), workspace_gib=args.workspace,
                            timing_cache=args.timing_cache, require_engine=args.require_engine,
                            require_accuracy=args.require_accuracy,
                            triton_repo=args.triton_repo, triton_backend=args.triton_backend,
                            triton_cpu_runtime=args.triton_cpu_runtime,
                            triton_cpu_precision=args.triton_cpu_precision,
                            triton_python_env=args.triton_python_env, int8_high_precision=args.int8_high_precision,
                            seed=args.seed)
    try:
        result = run_export(options)
    except (ExportError, CheckpointError, QuantizationError, UnsupportedOpError, RepositoryError,
            PythonEnvError) as err:
        LOG.error("%s", err)
        return 2
    print(print_summary(result))
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
