"""The export pipeline behind ``export/build_engine.py``: one function per artifact, options validated once.

Order: checkpoint -> inference graph -> plugin-mode ONNX (simplified around the plugin nodes) -> pure-ONNX graph
(gather subgraphs spliced in place of the plugin nodes) -> checker + TensorRT op check -> parity with PyTorch on
ONNX Runtime -> [INT8 Q/DQ + AP] -> [FP16 AutoCast ONNX] -> [TensorRT engine + metadata] -> [Triton repository] ->
report. Steps that need what this machine lacks (TensorRT, a GPU, ModelOpt) are skipped with their reason recorded;
only ``--require-engine`` turns a missing engine into a failure.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch

from sdconet.deploy import msda_plugin, qat
from sdconet.deploy.layer_groups import name_compute_nodes
from sdconet.deploy.msda_plugin import MSDA_EXCLUDE_PATTERN  # noqa: F401  (old import path)
from sdconet.engine.inference_graph import INPUT_NAME, build_inference_graph
from sdconet.deploy.onnx_export import (DEFAULT_OPSET, check_model, export_module, op_counts, save_model,
                                        simplify_around_custom_nodes)
from sdconet.deploy.op_support import assert_tensorrt_support
from sdconet.kernels.cpu import fused_cpu_kernel_ready
from sdconet.deploy.report import ExportReport, parity_figures, render_summary, sha256_of
from sdconet.runtime.metadata import ORT_DOMAINS, write_onnx_metadata
from sdconet.utils.logging import get_logger

LOG = get_logger(__name__)

MSDA_MODES = ("plugin", "onnx", "sdconet")
# --int8-exclude defaults, kept in float by every INT8 path: the layers whose INT8 moves the boxes (measured by
# benchmarks/results/int8_study.md and int8_study_spr.md on demo checkpoints; docs/export.md "Where INT8 loses accuracy" says why).
# Everything before and around the token selection: the Swin stem and first stage, the neck, the saliency head and
# the deformable encoder, the proposal (query selection) head, and the decoder's box heads; the Swin stages 1-3, the
# decoder's attention, FFNs and class heads (70 % of the MACs) stay INT8.
# ops ModelOpt's Q/DQ graph quantizes: the compute ops only. ModelOpt's own default also puts Q/DQ on residual
# Adds, LayerNorm inputs and TopK scores (TensorRT fusion points); on the demo checkpoint that cost 1.0 AP point and
# dropped agreement to 0.54, compute ops only: -0.09 / 0.972 (benchmarks/results/int8_study_spr.md)
DEFAULT_INT8_OP_TYPES: tuple[str, ...] = ("Conv", "Gemm", "MatMul")
DEFAULT_INT8_FLOAT_GROUPS = ("swin.patch_embed", "swin.stage0", "neck", "saliency_head", r"encoder\..*", "proposal_head",
                             "decoder.box_heads")  # the layer_groups.LAYER_GROUPS those patterns select
DEFAULT_INT8_EXCLUDE: tuple[str, ...] = (
    r".*patch_embed.*", r".*(?:/encoder/layers_0/|swin\.layers_0\.).*", r".*neck.*", r".*saliency.*",
    r".*foreground_attn.*", r".*(?:/encoder/layers\.|encoder\.layers\.)[0-9]+[/.].*", r".*query_selection.*",
    r".*box_heads.*")


TRITON_BACKENDS = ("auto", "trt", "onnx", "cpu")
TRITON_CPU_RUNTIMES = ("auto", "onnxruntime", "openvino")
TRITON_CPU_PRECISIONS = ("fp32", "bf16", "int8")
CPU_INT8_BACKENDS = ("onnxruntime", "openvino")


class ExportError(RuntimeError):
    """A requested export step cannot be done; the message says which and why."""


@dataclass
class ExportOptions:
    """Everything ``export/build_engine.py`` accepts (docs/export.md)."""

    checkpoint: str | None = None  # weights file or run directory; None = best checkpoint of the latest run
    runs_dir: str = "runs"
    out: str = "engines"
    name: str | None = None  # artifact stem; default sdconet_<config>_<imgsz>
    imgsz: int = 256
    max_batch: int = 8
    opt_batch: int = 1
    msda: str = "plugin"
    plugin_version: int = 1
    opset: int = DEFAULT_OPSET
    with_saliency: bool | None = None  # None = whenever the model has saliency on (scene maps need it)
    fp16: bool = False
    int8: bool = False
    calib_images: int = 256  # >= 256 (issue 21): augmented crops of the training split when it is smaller
    calib_dir: str | None = None  # calibrate on the user's own (LR) images instead of the training split
    calib_method: str = "entropy"  # ModelOpt's calibration (entropy | max); the CPU quantizers keep theirs
    # node-name regexes kept in float by every INT8 path (on top of the MSDA sampling subgraphs)
    int8_exclude: Sequence[str] = DEFAULT_INT8_EXCLUDE
    int8_op_types: Sequence[str] = DEFAULT_INT8_OP_TYPES  # ModelOpt --op_types_to_quantize (empty: its default)
    eval_images: int | None = None  # cap on the gate images (None = all of the gate set)
    gate_count: int = 200  # held-out synthetic images of the accuracy gate (sdconet.deploy.accuracy.gate_dataset)
    gate_images: str | None = None  # the user's held-out COCO images + JSON instead
    gate_ann: str | None = None
    allow_failed_gate: bool = False  # serve a reduced-precision model whose accuracy gate failed
    modelopt_python: str | None = None
    plugin_libs: Sequence[str] = field(default_factory=tuple)
    workspace_gib: float = 4.0
    timing_cache: str | None = None  # default <out>/timing_trt<version>_<gpu>.cache
    require_engine: bool = False
    require_accuracy: bool = False  # exit 1 when an accuracy gate (e.g. of an FP16/INT8 engine) fails
    # CPU INT8 by the CPU runtime's own quantizer (sdconet.deploy.cpu_quantize): "onnxruntime" and/or "openvino"
    cpu_int8: Sequence[str] = field(default_factory=tuple)
    triton_repo: str | None = None
    triton_backend: str = "auto"  # auto = trt when an engine was built, else cpu (python backend + ONNX Runtime)
    # detector_cpu's runtime in a cpu repository: auto = openvino on the plugin-mode ONNX (fused MSDA op, the fastest
    # CPU runtime measured) when openvino and the fused kernel are available here, else onnxruntime on the pure ONNX
    triton_cpu_runtime: str = "auto"
    triton_cpu_precision: str = "fp32"  # bf16: openvino's hint; int8: the --cpu-int8 model of the runtime
    # EXECUTION_ENV_PATH of the repository's python models: "current" = this Python's environment (checked here),
    # "none" = the server's own Python (NVIDIA's container), a path to an environment on the serving machine, or
    # "auto" = none for the trt/onnx backends (they need NVIDIA's container) and current for cpu
    triton_python_env: str = "auto"
    # ModelOpt --high_precision_dtype of the INT8 Q/DQ ONNX (the type of every layer left unquantized): "auto" = fp16
    # when the TensorRT here is >= 11 (strongly typed: fp32 would run those layers in FP32), else fp32
    int8_high_precision: str = "auto"
    parity_batch: int = 2
    seed: int = 0

    def validate(self) -> None:
        if self.msda not in MSDA_MODES:
            raise ExportError(f"--msda must be one of {', '.join(MSDA_MODES)}, got '{self.msda}'")
        if self.msda == "sdconet" and not msda_plugin.sdconet_plugin_available():
            raise ExportError("--msda sdconet needs sdconet/kernels/trt_plugin.py with PLUGIN_OP_TYPE and "
                              "PLUGIN_VERSION (the kernel teammate's plugin); it is not available yet")
        if self.imgsz <= 0 or self.imgsz % 32:
            raise ExportError(f"--imgsz must be a positive multiple of 32 (the encoder's stride), got {self.imgsz}")
        unknown = [b for b in self.cpu_int8 if b not in CPU_INT8_BACKENDS]
        if unknown:
            raise ExportError(f"--cpu-int8 must be among {', '.join(CPU_INT8_BACKENDS)}, got {', '.join(unknown)}")
        if self.cpu_int8 and self.calib_images < 1:
            raise ExportError(f"--calib-images must be >= 1, got {self.calib_images}")
        if not 1 <= self.opt_batch <= self.max_batch:
            raise ExportError(f"need 1 <= --opt-batch <= --max-batch, got {self.opt_batch} and {self.max_batch}")
        if self.opset < 17:
            raise ExportError(f"--opset must be >= 17, got {self.opset}")
        if self.int8 and self.calib_images < 1:
            raise ExportError(f"--calib-images must be >= 1, got {self.calib_images}")
        if self.triton_backend not in TRITON_BACKENDS:
            raise ExportError(f"--triton-backend must be one of {', '.join(TRITON_BACKENDS)}, "
                              f"got '{self.triton_backend}'")
        if self.triton_cpu_runtime not in TRITON_CPU_RUNTIMES:
            raise ExportError(f"--triton-cpu-runtime must be one of {', '.join(TRITON_CPU_RUNTIMES)}, "
                              f"got '{self.triton_cpu_runtime}'")
        if self.triton_cpu_precision not in TRITON_CPU_PRECISIONS:
            raise ExportError(f"--triton-cpu-precision must be one of {', '.join(TRITON_CPU_PRECISIONS)}, "
                              f"got '{self.triton_cpu_precision}'")
        if self.triton_cpu_precision == "int8" and self.triton_repo and not (
                set(self.cpu_int8) & ({"onnxruntime", "openvino"} if self.triton_cpu_runtime == "auto"
                                      else {self.triton_cpu_runtime})):
            raise ExportError(f"--triton-cpu-precision int8 serves the CPU quantizer's model: add --cpu-int8 "
                              f"{'openvino' if self.triton_cpu_runtime == 'auto' else self.triton_cpu_runtime}")
        if self.calib_method not in ("entropy", "max"):
            raise ExportError(f"--calib-method must be entropy or max, got '{self.calib_method}'")
        if self.calib_dir is not None and not Path(self.calib_dir).is_dir():
            raise ExportError(f"--calib-dir {self.calib_dir}: not a directory")
        if (self.gate_images is None) != (self.gate_ann is None):
            raise ExportError("--gate-images and --gate-ann go together (a folder of images and its COCO JSON)")
        if self.gate_count < 1:
            raise ExportError(f"--gate-count must be >= 1, got {self.gate_count}")
        from sdconet.deploy.layer_groups import check_patterns

        try:
            check_patterns(self.int8_exclude)
        except ValueError as err:
            raise ExportError(str(err)) from err
        if self.int8_high_precision not in ("auto", "fp16", "fp32"):
            raise ExportError(f"--int8-high-precision must be auto, fp16 or fp32, got '{self.int8_high_precision}'")
        if self.parity_batch < 1:
            raise ExportError(f"parity batch must be >= 1, got {self.parity_batch}")
        for lib in self.plugin_libs:
            if not Path(lib).is_file():
                raise ExportError(f"--plugin-lib {lib}: file not found")

    @property
    def precision(self) -> str:
        return "int8" if self.int8 else "fp16" if self.fp16 else "fp32"


def plugin_spec(options: ExportOptions) -> msda_plugin.PluginSpec:
    if options.msda == "sdconet":
        return msda_plugin.sdconet_plugin_spec()
    return msda_plugin.trt_plugin_spec(options.plugin_version)


@dataclass
class ExportResult:
    report_path: Path
    summary_path: Path
    report: dict
    exit_code: int


class Exporter:
    """Runs the export steps for one checkpoint; each ``step_*`` method produces one artifact family."""

    def __init__(self, options: ExportOptions) -> None:
        options.validate()
        self.options = options
        self.out = Path(options.out)
        self.spec = plugin_spec(options)
        self.plugin_types = [self.spec.op_type]
        self.extra_plugins = {self.spec.op_type: [str(self.spec.attributes.get("plugin_version", "1"))]}

    # ------------------------------------------------------------------------------------------------------------
    def run(self) -> ExportResult:
        from sdconet.engine.checkpoint import load_model_weights, resolve_checkpoint

        opts = self.options
        checkpoint = resolve_checkpoint(opts.checkpoint, runs_dir=opts.runs_dir)
        cfg, state_dict, meta = load_model_weights(checkpoint)
        self.cfg, self.meta = cfg, meta
        qat_ranges = None
        if meta.get("qat"):  # a QAT checkpoint: float weights + the fake-quant layers' activation ranges
            state_dict, qat_ranges = qat.split_qat_state(state_dict)
        self.name = opts.name or f"sdconet_{cfg.name}_{opts.imgsz}"
        self.report = ExportReport(self.name, checkpoint={"path": str(checkpoint), "sha256": sha256_of(checkpoint),
                                                          "config": cfg.name, "meta": meta},
                                   options=asdict(opts) | {"plugin_libs": [str(p) for p in opts.plugin_libs]})
        self.out.mkdir(parents=True, exist_ok=True)
        LOG.info("exporting %s (config %s) at %dx%d, MSDA %s -> %s/", checkpoint, cfg.name, opts.imgsz, opts.imgsz,
                 opts.msda, self.out)

        with_saliency = cfg.model.saliency.enabled if opts.with_saliency is None else opts.with_saliency
        graph = build_inference_graph(cfg, state_dict, msda_impl="plugin", with_saliency=with_saliency)
        self.qat_graph = None
        if qat_ranges is not None:
            # the fp32 artifacts are the float twin of the QAT weights; --int8 exports the fake-quant graph itself
            qat.prepare_qat(graph.model, meta["qat"]["exclude"])
            qat.load_qat_ranges(graph.model, qat_ranges, source=str(checkpoint))
            qat.set_quantization(graph.model, False)
            self.qat_graph = graph
        self.output_names = graph.output_names
        images = self.parity_images()
        with torch.no_grad():
            reference = [t.numpy() for t in graph(images)]

        plugin_model, pure_model = self.step_onnx(graph, images)
        pure_path = self.write_graph("onnx", pure_model, f"{self.name}.onnx")
        self.check_parity("onnx", pure_model, images, reference)
        plugin_path = None
        if opts.msda != "onnx":
            plugin_path = self.write_graph("onnx_plugin", plugin_model, f"{self.name}.plugin.onnx")
            self.check_parity("onnx_plugin", plugin_model, images, reference)

        int8_paths = self.step_int8(pure_path, plugin_model) if opts.int8 else None
        fp16_paths = self.step_fp16(pure_path, plugin_model) if opts.fp16 and not opts.int8 else None
        for backend in dict.fromkeys(opts.cpu_int8):
            self.step_cpu_int8(backend, pure_path, plugin_path)
        engine_path = self.step_engine(pure_path, plugin_path, int8_paths, fp16_paths)
        if engine_path is not None:
            self.check_engine(engine_path, images, reference, pure_path)
        if opts.triton_repo:
            self.step_triton(pure_path, engine_path)

        report_path, summary_path = self.report.write(self.out)
        data = json.loads(report_path.read_text())
        # passed None = not judged numerically (a reduced-precision engine: the accuracy gate judges it)
        failed_parity = [k for k, v in self.report.parity.items() if v["passed"] is False]
        exit_code = 0
        if failed_parity:
            LOG.error("parity with PyTorch failed for %s (see %s)", ", ".join(failed_parity), report_path)
            exit_code = 1
        if opts.require_engine and engine_path is None:
            LOG.error("--require-engine: no engine was built (%s)",
                      "; ".join(s["reason"] for s in self.report.skipped if s["step"] == "engine"))
            exit_code = 1
        if (self.report.triton or {}).get("refused"):
            exit_code = 1
        failed_gates = [k for k, v in self.report.accuracy.items() if v.get("passed") is False]
        if failed_gates:
            if opts.require_accuracy:
                LOG.error("--require-accuracy: the accuracy gate failed for %s (see %s)", ", ".join(failed_gates),
                          report_path)
                exit_code = 1
            else:
                LOG.warning("the accuracy gate failed for %s (see %s); an error only with --require-accuracy",
                            ", ".join(failed_gates), report_path)
        LOG.info("report: %s (summary %s)", report_path, summary_path)
        return ExportResult(report_path, summary_path, data, exit_code)

    # ------------------------------------------------------------------------------------------------------------
    def parity_images(self) -> torch.Tensor:
        """A fixed batch for the parity checks: seeded uniform noise (needs no dataset; exercises every path)."""
        generator = torch.Generator().manual_seed(self.options.seed)
        return torch.rand(self.options.parity_batch, 3, self.options.imgsz, self.options.imgsz, generator=generator)

    def step_onnx(self, graph, images: torch.Tensor) -> tuple[onnx.ModelProto, onnx.ModelProto]:
        """Plugin-mode export simplified around the plugin nodes, and the pure graph derived from it."""
        with msda_plugin.use_plugin_spec(self.spec):
            exported = export_module(graph, images, input_name=INPUT_NAME, output_names=self.output_names,
                                     opset=self.options.opset, custom_domains=[self.spec.domain])
        plugin_model = simplify_around_custom_nodes(exported)
        # onnxsim's fused Gemm_<k> nodes get their module's name back: --int8-exclude and the study address them
        name_compute_nodes(plugin_model)
        pure_model = msda_plugin.plugin_nodes_to_onnx(plugin_model, self.plugin_types)
        return plugin_model, pure_model

    def write_graph(self, kind: str, model: onnx.ModelProto, filename: str) -> Path:
        """checker + TensorRT op check, then write the ONNX file (with its ``sdconet.*`` metadata) and record it."""
        check_model(model)
        support = assert_tensorrt_support(model, self.extra_plugins, what=filename)
        plugin_nodes = any(n.domain not in ORT_DOMAINS for n in model.graph.node)
        write_onnx_metadata(model, class_names=self.class_names(), imgsz=self.options.imgsz,
                            msda=self.options.msda if plugin_nodes else "onnx", outputs=self.output_names,
                            precision="int8" if "int8" in kind else "fp16" if "fp16" in kind else "fp32")
        path = save_model(model, self.out / filename)
        self.report.add_artifact(kind, path)
        self.report.graphs[kind] = {"nodes": len(model.graph.node), "op_counts": op_counts(model),
                                    "op_support": support.to_dict()}
        LOG.info("wrote %s (%d nodes)", path, len(model.graph.node))
        return path

    def class_names(self) -> list[str]:
        """The checkpoint's category names, else ``class_<i>``."""
        names = list(self.meta.get("category_names") or [])
        return names or [f"class_{i}" for i in range(self.cfg.model.detector.num_classes)]

    def check_parity(self, kind: str, model: onnx.ModelProto, images: torch.Tensor,
                     reference: Sequence[np.ndarray], judged: bool = True) -> dict:
        """ONNX Runtime vs PyTorch on the parity batch; ``judged=False`` records the figures with ``passed`` None
        (a graph whose precision differs by design: its accuracy gate judges it)."""
        from sdconet.runtime.onnxruntime_runner import OnnxRuntimeRunner

        with OnnxRuntimeRunner(model, providers=["CPUExecutionProvider"]) as runner:
            outputs = runner.run(images.numpy())
        figures = parity_figures(reference, [outputs[name] for name in self.output_names], self.options.imgsz)
        if not judged:
            figures["passed"] = None
        self.report.parity[kind] = figures
        LOG.info("parity %s vs PyTorch: box %.2e px, score %.2e, labels %s -> %s", kind,
                 figures["max_box_error_px"], figures["max_score_error"], figures["top_labels_match"],
                 {True: "ok", False: "FAILED", None: "recorded (judged by the accuracy gate)"}[figures["passed"]])
        return figures

    # ------------------------------------------------------------------------------------------------------------
    def _datasets(self):
        """(training split, gate set): the gate set is the held-out set of
        :func:`sdconet.deploy.accuracy.gate_dataset` (built once)."""
        from sdconet.data import build_dataset
        from sdconet.deploy.accuracy import gate_dataset

        data_cfg, upscale = self.cfg.data, self.cfg.model.upscale
        if getattr(self, "_gate_set", None) is None:
            self._gate_set = gate_dataset(data_cfg, upscale, images=self.options.gate_count,
                                          gate_images=self.options.gate_images, gate_ann=self.options.gate_ann)
        return build_dataset(data_cfg, "train", upscale, train=False), self._gate_set

    def calibration(self) -> np.ndarray:
        """The calibration inputs of every INT8 path (drawn once): ``--calib-dir`` images, else the training
        split (augmented crops when it has fewer than ``--calib-images``)."""
        from sdconet.deploy import quantize

        if getattr(self, "_calib", None) is None:
            opts = self.options
            if opts.calib_dir is not None:
                self._calib = quantize.calibration_images_from_dir(opts.calib_dir, opts.calib_images, opts.imgsz,
                                                                   opts.seed)
                source = f"--calib-dir {opts.calib_dir}"
            else:
                train_set, _ = self._datasets()
                self._calib = quantize.calibration_images(train_set, opts.calib_images, opts.imgsz, opts.seed)
                source = f"training split ({len(train_set)} images)"
            self.report.calibration = {"images": int(self._calib.shape[0]), "source": source}
        return self._calib

    def int8_exclusions(self, model: onnx.ModelProto) -> list[str]:
        """Names of ``model``'s compute nodes that ``--int8-exclude`` keeps in float (recorded in the report)."""
        from sdconet.deploy.layer_groups import COMPUTE_OPS, matching_nodes

        names = matching_nodes(model, list(self.options.int8_exclude), COMPUTE_OPS)
        if self.options.int8_exclude and not names:
            LOG.warning("--int8-exclude %s matches no Conv/MatMul/Gemm node", list(self.options.int8_exclude))
        return names

    def gate_reference(self, pure_path: Path) -> dict:
        """The FP32 pure ONNX's results on the gate set (computed once for every gated artifact)."""
        from sdconet.deploy.accuracy import reference_results
        from sdconet.runtime.onnxruntime_runner import OnnxRuntimeRunner

        cache = self.__dict__.setdefault("_references", {})
        if str(pure_path) not in cache:
            _, gate_set = self._datasets()
            with OnnxRuntimeRunner(pure_path, providers=["CPUExecutionProvider"],
                                   class_names=self.class_names()) as fp32:
                cache[str(pure_path)] = reference_results(fp32, gate_set, self.options.imgsz,
                                                          self.options.eval_images)
        return cache[str(pure_path)]

    def step_int8(self, pure_path: Path, plugin_model: onnx.ModelProto) -> dict | None:
        """ModelOpt INT8 PTQ on the pure graph (MSDA subgraphs excluded), plugin swap, FP32-vs-INT8 AP on CPU."""
        from sdconet.deploy import quantize

        opts = self.options
        if self.qat_graph is not None:
            return self.step_qat_int8(pure_path)
        reason = quantize.modelopt_unavailable_reason(opts.modelopt_python)
        if reason:
            self.report.skip("int8", reason)
            self.report.int8 = {"skipped": reason}
            LOG.warning("INT8 skipped: %s", reason)
            return None
        _, val_set = self._datasets()
        calib = self.calibration()
        calib_path = quantize.write_calibration_data(calib, self.out / f"{self.name}.calib.npz", INPUT_NAME)
        int8_path = self.out / f"{self.name}.int8.onnx"
        excluded = self.int8_exclusions(onnx.load(str(pure_path), load_external_data=False))
        summary = quantize.quantize_int8(pure_path, int8_path, calib_path, python=opts.modelopt_python,
                                         exclude_nodes=[MSDA_EXCLUDE_PATTERN, *opts.int8_exclude],
                                         calibration_method=opts.calib_method,
                                         op_types_to_quantize=tuple(opts.int8_op_types) or None,
                                         high_precision_dtype=self.int8_high_precision(),
                                         log_path=self.out / f"{self.name}.int8.log")
        summary["excluded"] = excluded
        int8_model = onnx.load(str(int8_path))
        self.write_graph("onnx_int8", int8_model, int8_path.name)
        paths = {"onnx": int8_path}
        if opts.msda != "onnx":
            paths["plugin"] = self.write_plugin_twin(int8_model, plugin_model, "int8")
        self.report.int8 = {"calibration_images": int(calib.shape[0]), "quantization": summary}
        if summary.get("high_precision_dtype", "fp32") == "fp32":  # an FP16-typed Q/DQ graph is TensorRT's alone
            from sdconet.deploy.layer_groups import int8_mac_fraction
            from sdconet.runtime.onnxruntime_runner import OnnxRuntimeRunner

            with OnnxRuntimeRunner(int8_path, providers=["CPUExecutionProvider"],
                                   class_names=self.class_names()) as runner:
                gate = self.engine_accuracy(runner, pure_path, key="onnxruntime_int8-qdq", target="int8-qdq",
                                            macs=int8_mac_fraction(int8_path),
                                            extra={"calibration_images": int(calib.shape[0]),
                                                   "excluded": list(opts.int8_exclude)})
            if gate is not None:
                self.report.int8 |= {"fp32": {"AP": gate["AP_fp32"], "AP75": gate["AP75_fp32"]},
                                     "int8": {"AP": gate["AP"], "AP75": gate["AP75"]},
                                     "ap_drop_points": gate["ap_drop_points"], "images": gate["images"]}
                LOG.info("INT8 Q/DQ AP %.4f vs FP32 %.4f (drop %.2f points)", gate["AP"], gate["AP_fp32"],
                         gate["ap_drop_points"])
        else:
            self.report.skip("int8_accuracy", "the FP16-typed Q/DQ graph runs on TensorRT only: its gate is the "
                                              "engine's (tensorrt_int8)")
        return paths

    def step_qat_int8(self, pure_path: Path) -> dict:
        """``--int8`` of a QAT checkpoint: its fake-quant graph exported as the Q/DQ ONNX (torch writes the
        ``QuantizeLinear`` / ``DequantizeLinear`` pairs; no ModelOpt pass), in both MSDA modes, then two gates: against
        the float twin of the same weights (the precision change alone, key ``onnxruntime_int8-qdq``) and against
        the FP32 checkpoint the QAT started from (what training earned, key ``onnxruntime_int8-qat``, the QAT
        targets)."""
        from sdconet.deploy.layer_groups import int8_mac_fraction
        from sdconet.runtime.onnxruntime_runner import OnnxRuntimeRunner

        info = self.meta["qat"]
        images = self.parity_images()
        qat.set_quantization(self.qat_graph.model, True)
        try:
            with torch.no_grad():
                reference = [t.numpy() for t in self.qat_graph(images)]
            plugin_model, pure_model = self.step_onnx(self.qat_graph, images)
        finally:
            qat.set_quantization(self.qat_graph.model, False)
        int8_path = self.write_graph("onnx_int8", pure_model, f"{self.name}.int8.onnx")
        paths = {"onnx": int8_path}
        if self.options.msda != "onnx":
            paths["plugin"] = self.write_graph("onnx_int8_plugin", plugin_model, f"{self.name}.int8.plugin.onnx")
        # torch fake quantization and ONNX Runtime's Q/DQ kernels round a few values differently: a swapped rank on
        # noise inputs is no defect, so the figures are recorded and the accuracy gates judge
        self.check_parity("onnx_int8", pure_model, images, reference, judged=False)
        macs = int8_mac_fraction(int8_path)
        summary = {"tool": "sdconet.deploy.qat (torch fake quantization)", "format": "QDQ", "qat": info,
                   "macs": macs}
        self.report.int8 = {"calibration_images": info.get("calibration_images"), "quantization": summary}
        extra = {"calibration_images": info.get("calibration_images"), "excluded": list(info.get("exclude", [])),
                 "qat": True}
        with OnnxRuntimeRunner(int8_path, providers=["CPUExecutionProvider"],
                               class_names=self.class_names()) as runner:
            gate = self.engine_accuracy(runner, pure_path, key="onnxruntime_int8-qdq", target="int8-qdq", macs=macs,
                                        extra=extra)
            source_path = self.source_fp32_onnx(info)
            if source_path is not None:
                self.engine_accuracy(runner, source_path, key="onnxruntime_int8-qat", target="int8-qat", macs=macs,
                                     extra=extra | {"reference": "the FP32 checkpoint the QAT started from"})
        if gate is not None:
            self.report.int8 |= {"fp32": {"AP": gate["AP_fp32"], "AP75": gate["AP75_fp32"]},
                                 "int8": {"AP": gate["AP"], "AP75": gate["AP75"]},
                                 "ap_drop_points": gate["ap_drop_points"], "images": gate["images"]}
        return paths

    def source_fp32_onnx(self, info: dict) -> Path | None:
        """The pure FP32 ONNX of the checkpoint a QAT run started from (``meta.qat.source``), or None with the reason
        in the report when that file is gone or changed."""
        from sdconet.engine.checkpoint import load_model_weights

        source = Path(info.get("source", {}).get("path", ""))
        if not source.is_file():
            self.report.skip("int8_qat_vs_source", f"the QAT's FP32 source checkpoint {source} is not on this machine")
            return None
        if sha256_of(source) != info["source"].get("sha256"):
            self.report.skip("int8_qat_vs_source", f"{source} changed since the QAT run (SHA-256 differs)")
            return None
        cfg, state_dict, _ = load_model_weights(source)
        graph = build_inference_graph(cfg, state_dict, msda_impl="plugin", with_saliency=self.qat_graph.with_saliency)
        _, pure_model = self.step_onnx(graph, self.parity_images())
        path = self.out / f"{self.name}.qat_source_fp32.onnx"
        write_onnx_metadata(pure_model, class_names=self.class_names(), imgsz=self.options.imgsz, msda="onnx",
                            outputs=self.output_names, precision="fp32")
        return save_model(pure_model, path)

    def int8_high_precision(self) -> str:
        """ModelOpt's high-precision type for the INT8 graph (``--int8-high-precision``; auto: fp16 for TensorRT 11
        here, whose strongly typed build would otherwise run every unquantized layer in FP32)."""
        from sdconet.deploy import tensorrt_build

        choice = self.options.int8_high_precision
        if choice != "auto":
            return choice
        version = tensorrt_build.tensorrt_version()
        return "fp16" if version is not None and tensorrt_build.is_strongly_typed_only(version) else "fp32"

    def write_plugin_twin(self, model: onnx.ModelProto, plugin_model: onnx.ModelProto, precision: str) -> Path:
        """The plugin-mode twin of a quantized / AutoCast pure graph (``<name>.<precision>.plugin.onnx``): its MSDA
        subgraphs swapped back for the plugin nodes. In a mixed-precision graph the plugin's float inputs may come in
        different types, and it needs one, hence the casts."""
        swapped = msda_plugin.onnx_msda_to_plugin_nodes(model, plugin_model, self.plugin_types, cast_float_inputs=True)
        return self.write_graph(f"onnx_{precision}_plugin", swapped, f"{self.name}.{precision}.plugin.onnx")

    def step_fp16(self, pure_path: Path, plugin_model: onnx.ModelProto) -> dict | None:
        """FP16 ONNX from ModelOpt AutoCast (what TensorRT 11's strongly typed build needs for FP16)."""
        from sdconet.deploy import quantize

        opts = self.options
        reason = quantize.modelopt_unavailable_reason(opts.modelopt_python)
        if reason:
            self.report.skip("fp16_onnx", f"{reason} (only TensorRT 11 needs the FP16 ONNX; TensorRT 10 builds FP16 "
                                          f"from the FP32 ONNX with the FP16 flag)")
            return None
        fp16_path = self.out / f"{self.name}.fp16.onnx"
        quantize.autocast_fp16(pure_path, fp16_path, python=opts.modelopt_python, exclude_nodes=[MSDA_EXCLUDE_PATTERN],
                               log_path=self.out / f"{self.name}.fp16.log")
        fp16_model = onnx.load(str(fp16_path))
        self.write_graph("onnx_fp16", fp16_model, fp16_path.name)
        paths = {"onnx": fp16_path}
        if opts.msda != "onnx":
            paths["plugin"] = self.write_plugin_twin(fp16_model, plugin_model, "fp16")
        return paths

    def step_engine(self, pure_path: Path, plugin_path: Path | None, int8_paths: dict | None,
                    fp16_paths: dict | None) -> Path | None:
        """Serialized TensorRT engine (``.plan``, as Triton names it) + ``.plan.json`` metadata, or a recorded skip."""
        from sdconet.deploy import tensorrt_build

        opts = self.options
        reason = tensorrt_build.tensorrt_unavailable_reason()
        if reason:
            self.report.skip("engine", reason)
            LOG.warning("TensorRT engine skipped: %s", reason)
            return None
        key = "plugin" if opts.msda != "onnx" else "onnx"
        strongly_typed = tensorrt_build.tensorrt_major() >= 11
        if opts.int8:
            if int8_paths is None:
                self.report.skip("engine", "INT8 requested but no Q/DQ ONNX was produced (see the int8 step)")
                return None
            onnx_path = int8_paths[key]
        elif opts.fp16 and strongly_typed:
            if fp16_paths is None:
                self.report.skip("engine", "TensorRT 11 needs the AutoCast FP16 ONNX, which was not produced")
                return None
            onnx_path = fp16_paths[key]
        else:
            onnx_path = plugin_path if key == "plugin" else pure_path
        build = tensorrt_build.EngineBuildOptions(
            precision=opts.precision, min_batch=1, opt_batch=opts.opt_batch, max_batch=opts.max_batch,
            workspace_gib=opts.workspace_gib, timing_cache=opts.timing_cache, timing_cache_dir=str(self.out),
            plugin_libs=tuple(opts.plugin_libs), sdconet_plugin=opts.msda == "sdconet")
        engine_path = self.out / f"{self.name}.{opts.precision}.plan"
        try:
            facts = tensorrt_build.build_engine(onnx_path, engine_path, build)
        except ValueError as err:  # the graph's types do not give the requested precision
            raise ExportError(str(err)) from err
        # facts["precision"] is what the engine really runs in (a strongly typed build takes it from the graph);
        # class names let TensorRTRunner describe the engine without the ONNX
        metadata = facts | {"onnx": str(onnx_path), "onnx_sha256": sha256_of(onnx_path),
                            "class_names": self.class_names(),
                            "imgsz": opts.imgsz, "msda": opts.msda, "plugin": self.spec.name,
                            "export_options": self.report.options, "path": str(engine_path)}
        meta_path = tensorrt_build.write_engine_metadata(engine_path, metadata)
        self.report.add_artifact("engine", engine_path, precision=metadata["precision"])
        self.report.add_artifact("engine_metadata", meta_path)
        self.report.engine = metadata
        return engine_path

    def check_engine(self, engine_path: Path, images: torch.Tensor, reference: Sequence[np.ndarray],
                     pure_path: Path) -> dict | None:
        """Run the engine on the parity images and record ``report.parity["engine"]``.

        An FP32 engine must match PyTorch like the ONNX graphs (a failure fails the export); FP16/INT8 engines are
        not expected to, so their figures are recorded with ``passed: None`` and the accuracy gate against the FP32
        ONNX on the validation set judges them (``report.accuracy["tensorrt_<precision>"]``; failing the export
        only with ``--require-accuracy``).
        """
        precision = self.report.engine["precision"]
        try:
            from sdconet.runtime.tensorrt_runner import TensorRTRunner
        except ImportError as err:
            self.report.skip("engine_parity", f"no TensorRT runner to run the engine with ({err})")
            return None
        with TensorRTRunner(engine_path, plugin_libs=tuple(self.options.plugin_libs)) as runner:
            outputs = runner.run(images.numpy())
            if precision != "fp32":
                self.engine_accuracy(runner, pure_path)
        figures = parity_figures(reference, [outputs[name] for name in self.output_names], self.options.imgsz)
        figures["precision"] = precision
        if precision != "fp32":
            figures["numeric_passed"] = figures["passed"]
            figures["passed"] = None
            figures["judged_by"] = f"accuracy gate (report.accuracy.{precision})"
        self.report.parity["engine"] = figures
        LOG.info("parity engine (%s) vs PyTorch: box %.2e px, score %.2e, labels %s -> %s", precision,
                 figures["max_box_error_px"], figures["max_score_error"], figures["top_labels_match"],
                 {True: "ok", False: "FAILED", None: "recorded (reduced precision)"}[figures["passed"]])
        return figures

    def step_cpu_int8(self, backend: str, pure_path: Path, plugin_path: Path | None = None) -> Path | None:
        """INT8 by ``backend``'s own quantizer on training-split images, then the accuracy gate vs FP32
        (``report.accuracy["<backend>_int8"]``). A missing quantizer is a recorded skip. OpenVINO quantizes the
        plugin-mode ONNX (fused MSDA op kept fp32) when there is one and the fused kernel builds here."""
        from sdconet.deploy import cpu_quantize, layer_groups

        opts = self.options
        calib = self.calibration()
        try:
            if backend == "onnxruntime":
                from sdconet.runtime.onnxruntime_runner import OnnxRuntimeRunner

                path = self.out / f"{self.name}.cpu_int8.onnx"
                summary = cpu_quantize.quantize_onnxruntime_int8(pure_path, path, calib, input_name=INPUT_NAME,
                                                                 exclude=opts.int8_exclude)
                # not write_graph: a CPU graph (asymmetric activation zero-points) is not checked against TensorRT;
                # the quantizer carried the sdconet.* metadata over
                check_model(path)
                self.report.add_artifact("onnx_cpu_int8", path, quantization=summary)
                runner = OnnxRuntimeRunner(path, providers=["CPUExecutionProvider"], class_names=self.class_names())
                macs = layer_groups.int8_mac_fraction(path)
            else:
                from sdconet.runtime.openvino_runner import OpenVINORunner

                path = self.out / f"{self.name}.openvino_int8.xml"
                fused = plugin_path is not None and fused_cpu_kernel_ready("OpenVINO INT8 of the pure ONNX")
                source = plugin_path if fused else pure_path
                summary = cpu_quantize.quantize_openvino_int8(source, path, calib, exclude=opts.int8_exclude)
                self.report.add_artifact("openvino_int8", path, quantization=summary)
                self.report.add_artifact("openvino_int8_weights", path.with_suffix(".bin"))
                runner = OpenVINORunner(path, precision="int8", class_names=self.class_names())
                macs = summary.get("macs")
        except cpu_quantize.CPUQuantizationError as err:
            self.report.skip(f"{backend}_int8", str(err))
            LOG.warning("%s INT8 skipped: %s", backend, err)
            return None
        LOG.info("%s INT8 written to %s (%s s)", backend, path, summary["seconds"])
        with runner:
            self.engine_accuracy(runner, pure_path, key=f"{backend}_int8", target="int8", macs=macs,
                                 extra={"calibration_images": int(calib.shape[0]),
                                        "excluded": list(opts.int8_exclude)})
        return path

    def engine_accuracy(self, engine_runner, pure_path: Path, key: str | None = None, *, target: str | None = None,
                        macs: dict | None = None, extra: dict | None = None) -> dict | None:
        """The accuracy gate of a reduced-precision runner (default key ``tensorrt_<precision>``) against the FP32
        pure ONNX (ONNX Runtime CPU) on the held-out gate set, recorded as ``report.accuracy[key]`` (with
        ``extra``: calibration size, exclusions). ``macs``: the candidate's INT8 MAC share
        (:mod:`sdconet.deploy.layer_groups`); a TensorRT INT8 engine takes the share of the Q/DQ ONNX it was built
        from."""
        from sdconet.deploy.accuracy import accuracy_gate
        from sdconet.runtime.onnxruntime_runner import OnnxRuntimeRunner

        key = key or f"tensorrt_{engine_runner.precision}"
        try:
            _, val_set = self._datasets()
            reference = self.gate_reference(pure_path)
        except Exception as err:  # noqa: BLE001 - no held-out data on this machine: the gate cannot run
            self.report.skip("engine_accuracy", f"no held-out set for the accuracy gate ({err})")
            return None
        if macs is None and engine_runner.precision == "int8" and (self.report.engine or {}).get("onnx"):
            from sdconet.deploy.layer_groups import int8_mac_fraction

            macs = int8_mac_fraction((self.report.engine or {})["onnx"])
        with OnnxRuntimeRunner(pure_path, providers=["CPUExecutionProvider"],
                               class_names=self.class_names()) as fp32:
            gate = accuracy_gate(fp32, engine_runner, val_set, limit=self.options.eval_images,
                                 imgsz=self.options.imgsz, reference=reference, macs=macs,
                                 target=target or ("int8-qdq" if engine_runner.precision == "int8" else None))
        gate |= extra or {}
        self.report.accuracy[key] = gate
        LOG.info("accuracy gate %s: AP %.4f vs FP32 %.4f (drop %.2f pt), AP50 drop %.2f pt, agreement %s, int8 MAC "
                 "share %s -> %s", key, gate["AP"], gate["AP_fp32"], gate["ap_drop_points"], gate["ap50_drop_points"],
                 gate["agreement"], gate["int8_mac_fraction"], "ok" if gate["passed"] else
                 "FAILED (" + "; ".join(gate.get("reasons", [])) + ")")
        return gate

    def step_triton(self, pure_path: Path, engine_path: Path | None) -> None:
        """Populate the Triton model repository with the serving teammate's builder."""
        try:
            from sdconet.serve.triton_repo import RepositoryOptions, build_repository, load_manifest
        except ImportError as err:
            raise ExportError(f"--triton-repo needs sdconet.serve.triton_repo.build_repository ({err})") from err
        backend = self.options.triton_backend
        if backend == "auto":
            backend = "trt" if engine_path is not None else "cpu"
        if backend == "trt" and engine_path is None:
            raise ExportError("--triton-backend trt needs a TensorRT engine, and none was built (see the skipped "
                              "steps); use --triton-backend onnx (NVIDIA's Triton container) or cpu")
        class_names = self.class_names()
        python_env, check_env = repository_python_env(self.options.triton_python_env, backend)
        cpu_model, cpu_runtime = self.triton_cpu_model() if backend == "cpu" else (None, "auto")
        repo_options = RepositoryOptions(python_env=python_env, check_python_env=check_env,
                                         plugin_libs=tuple(self.options.plugin_libs) if backend == "trt" else (),
                                         cpu_runtime=cpu_runtime, cpu_precision=self.options.triton_cpu_precision)
        gate = self.served_gate(backend, cpu_runtime)
        if gate is not None and gate["passed"] is False and not self.options.allow_failed_gate:
            reason = (f"the accuracy gate of the model it would serve ({gate['key']}) failed: "
                      f"{'; '.join(gate['reasons'])}; the artifact is kept, pass --allow-failed-gate to serve it")
            self.report.skip("triton", reason)
            self.report.triton = {"repo": None, "backend": backend, "refused": reason}
            LOG.error("Triton repository not written: %s", reason)
            return
        repo = build_repository(self.options.triton_repo, onnx_path=pure_path, engine_path=engine_path,
                                backend=backend, imgsz=self.options.imgsz, max_batch=self.options.max_batch,
                                class_names=class_names, options=repo_options, cpu_model=cpu_model,
                                gate=gate, allow_failed_gate=self.options.allow_failed_gate)
        self.report.triton = {"repo": str(repo), "backend": backend, "accuracy_gate": gate}
        if backend == "cpu":
            self.report.triton["cpu_runtime"] = load_manifest(repo)["cpu_runtime"]
        if engine_path is None:
            self.report.skip("triton_trt", f"no TensorRT engine: the repository serves the pure ONNX ({backend} "
                                           "deployment)")
        LOG.info("Triton repository written to %s (backend %s)", repo, backend)

    def served_gate(self, backend: str, cpu_runtime: str) -> dict | None:
        """The accuracy gate of the model a repository of ``backend`` would serve (None for fp32: nothing to gate;
        a reduced precision whose gate could not run gives ``passed: None``)."""
        if backend == "trt":
            precision = (self.report.engine or {}).get("precision", "fp32")
            key = f"tensorrt_{precision}"
        elif backend == "cpu" and self.options.triton_cpu_precision == "int8":
            precision, key = "int8", f"{cpu_runtime}_int8"
        else:  # fp32 ONNX, or OpenVINO's bf16 hint (an execution hint of the server, not an artifact gated here)
            return None
        if precision == "fp32":
            return None
        gate = self.report.accuracy.get(key)
        if gate is None:
            return {"key": key, "passed": None, "reasons": ["no accuracy gate was run for this model"]}
        return {"key": key, "passed": gate["passed"], "reasons": gate.get("reasons", []),
                **{k: gate.get(k) for k in ("ap_drop_points", "ap50_drop_points", "agreement", "int8_mac_fraction",
                                            "images")}}

    def triton_cpu_model(self) -> tuple[Path | None, str]:
        """(cpu_model, cpu_runtime) of a cpu repository for ``--triton-cpu-runtime`` / ``--triton-cpu-precision``.

        int8: the ``--cpu-int8`` model of the runtime (auto: OpenVINO's NNCF IR, else ONNX Runtime's QDQ ONNX).
        Otherwise auto means OpenVINO on the plugin-mode ONNX (the fused MSDA op; the fastest CPU runtime measured,
        docs/cpu-runtime.md) when openvino and the fused kernel are available here, else ONNX Runtime on the pure
        ONNX; openvino without a plugin-mode ONNX (``--msda onnx``) runs the pure ONNX.
        """
        opts = self.options
        artifacts = {entry["kind"]: Path(entry["path"]) for entry in self.report.artifacts}
        runtime = opts.triton_cpu_runtime
        if opts.triton_cpu_precision == "int8":
            kinds = {"openvino": "openvino_int8", "onnxruntime": "onnx_cpu_int8"}
            wanted = tuple(kinds) if runtime == "auto" else (runtime,)
            found = [r for r in wanted if kinds[r] in artifacts]
            if not found:
                raise ExportError(f"--triton-cpu-precision int8: no {' or '.join(wanted)} INT8 model was written "
                                  f"(see the skipped steps of --cpu-int8)")
            return artifacts[kinds[found[0]]], found[0]
        if runtime == "auto":
            runtime = "openvino" if opts.triton_cpu_precision == "bf16" or (
                "onnx_plugin" in artifacts and fused_cpu_kernel_ready()) else "onnxruntime"
        if runtime == "openvino":
            return artifacts.get("onnx_plugin"), runtime
        return None, runtime


def repository_python_env(choice: str, backend: str) -> tuple[str | None, bool]:
    """``--triton-python-env`` -> (EXECUTION_ENV_PATH or None, check it here?) for a repository of ``backend``.

    ``auto``: none for trt/onnx, which need NVIDIA's container (its python models run on the container's own Python,
    and a build host's venv path would not exist there), current for cpu (the bundled server needs numpy < 2).
    """
    if choice == "auto":
        choice = "current" if backend == "cpu" else "none"
    if choice == "none":
        return None, False
    if choice == "current":
        return sys.prefix, True
    return choice, False


def run_export(options: ExportOptions) -> ExportResult:
    return Exporter(options).run()


def print_summary(result: ExportResult) -> str:
    return render_summary(result.report)
