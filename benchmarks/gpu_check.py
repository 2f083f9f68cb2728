#!/usr/bin/env python
"""The GPU check: one command that measures what only a CUDA GPU can tell us, within a fixed time budget.

    python3 benchmarks/gpu_check.py --json runs/gpu_check.json          # default --budget-s 240

What it runs, in this order (each step is skipped, with the reason, when the remaining budget is too small):

1. device facts (GPU, compute capability, memory, driver, CUDA, torch/triton/numpy/timm versions);
2. the MSDA op at the paper's shapes (value tokens 1360 = 32²+16²+8²+4², 8 heads x 32 channels, 4 points; 898
   encoder queries, 300 decoder queries): Triton kernel vs grid_sample vs gather, fp32/fp16/bf16, forward and
   forward+backward, each with its largest error against the fp32 grid_sample reference (outputs and gradients);
3. the paper-size model (``--config paper``, 256² LR) at batch 1 and 8: eager fp32, AMP fp16, AMP bf16 and a CUDA
   graph (AMP fp16), latency and peak memory;
4. one training step (forward with denoising and SR, losses, backward, AdamW; AMP bf16) at batch 2 and 8: images/s
   and peak memory (the Hungarian matcher needs scipy; without it the step is timed with a surrogate loss and says
   so);
5. torch.compile (AMP fp16) at batch 1 and 8, last because it is the slowest to prepare.

A row that does not fit the remaining budget is recorded as skipped; a measurement still running when the budget
ends is interrupted (SIGALRM) and the check stops there.

It writes the JSON and the markdown table next to it (``.md``) after every measurement (``"complete": false``
until the end), so a run cut short, even killed, still leaves its figures; at the end the JSON says
``"complete": true`` and the table also goes to stdout. The JSON (and the no-CUDA plan) carries a ``provenance``
object (:mod:`sdconet.utils.provenance`: command, commit, versions, CPU). The budget clock starts before
``import torch``, and an alarm that torch.compile wraps in its own exception still stops the check as budgeted. Before
any model row the timm version is checked the way the encoder checks it, so an unsupported timm skips those rows with
one clear reason.
Without CUDA it prints the plan, writes it to ``--json`` and exits 0 (``--device cpu`` runs the CPU-capable rows
instead, e.g. with ``--config tiny --imgsz 64``, to test the check itself: its figures are not GPU figures).

On a GPU the JSON's ``environment.results_file`` names where it is committed:
``benchmarks/results/gpu_check_<gpu>.json`` (:func:`gpu_slug` of the GPU name); docs/gpu-and-jetson.md § 0 has the
plan of the day.

It imports only torch, triton, numpy and this package's model code (which needs timm): no onnx, onnxruntime,
pycocotools or TensorRT, so it runs on a bare GPU machine that cannot install packages.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import platform
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

DEFAULT_BUDGET_S = 240.0
MSDA_QUERIES = (898, 300)  # encoder tokens after saliency filtering (first layer), decoder queries
MSDA_DTYPES = ("fp32", "fp16", "bf16")
MSDA_FORMS = ("grid_sample", "gather", "triton")
MODEL_VARIANTS = ("eager_fp32", "eager_amp_fp16", "eager_amp_bf16", "cuda_graph_amp_fp16", "compile_amp_fp16")
INFER_BATCHES = (1, 8)
TRAIN_BATCHES = (2, 8)
# rough minimum seconds a step needs on a data-center GPU; a step starts only when at least this much is left
STEPS = ("msda", "model", "train", "compile")
# what runs, in order: eager rows, then training, then the CUDA graph (a failed capture can leave the device unusable
# for what follows) and torch.compile (the slowest to prepare, the one a short budget can best do without)
RUN_ORDER: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("msda", ()), ("model", ("eager_fp32", "eager_amp_fp16", "eager_amp_bf16")), ("train", ()),
    ("model", ("cuda_graph_amp_fp16",)), ("compile", ("compile_amp_fp16",)))
STEP_MIN_S = {"msda": 5.0, "model": 8.0, "train": 10.0, "cuda_graph": 10.0, "compile": 60.0}


class BudgetSpent(Exception):
    """The time budget ran out in the middle of a measurement (raised by the alarm of Budget.hard_stop)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="wall-clock budget of the whole check; steps that do not fit are skipped")
    parser.add_argument("--json", type=Path, default=Path("runs/gpu_check.json"),
                        help="JSON report (rewritten after every measurement); the markdown table goes next to it")
    parser.add_argument("--config", default="paper", help="model config preset for the model and training rows")
    parser.add_argument("--imgsz", type=int, default=256, help="LR input side of the model rows")
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto",
                        help="auto: measure on CUDA, or print the plan without it; cpu: run the CPU-capable rows "
                             "(a self-test of this script, not a GPU figure)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS),
                        help="which steps to run (e.g. a rerun of only 'compile'); the device facts always")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per row (fewer if the budget is "
                                                              "short)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    if args.imgsz <= 0 or args.imgsz % 32:
        parser.error(f"--imgsz must be a positive multiple of 32, got {args.imgsz}")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Plan and report
# ----------------------------------------------------------------------------------------------------------------
def build_plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every row the check would measure, in order (what the CPU run prints)."""
    plan: list[dict[str, Any]] = [{"step": "device", "what": "GPU, compute capability, memory, driver, versions"}]
    if "msda" in args.steps:
        for mode in ("fwd", "fwd+bwd"):
            for queries in MSDA_QUERIES:
                for dtype in MSDA_DTYPES:
                    plan += [{"step": "msda", "form": form, "dtype": dtype, "queries": queries, "mode": mode}
                             for form in MSDA_FORMS]
    for step, variants in RUN_ORDER[1:]:
        if step not in args.steps:
            continue
        if step == "train":
            plan += [{"step": "train", "batch": batch, "config": args.config, "imgsz": args.imgsz}
                     for batch in TRAIN_BATCHES]
        else:
            plan += [{"step": "model", "variant": variant, "batch": batch, "config": args.config,
                      "imgsz": args.imgsz} for variant in variants for batch in INFER_BATCHES]
    return plan


class Report:
    """The JSON document and its markdown table, both rewritten atomically after every row so a run cut short (by
    the budget, or by the device machine's own time limit killing the process) keeps its figures in both forms."""

    def __init__(self, path: Path, args: argparse.Namespace, started: float | None = None) -> None:
        self.path = path
        self.started = time.monotonic() if started is None else started  # the budget's start: before import torch
        self.data: dict[str, Any] = {
            "command": " ".join([Path(sys.argv[0]).name if sys.argv else "gpu_check.py", *sys.argv[1:]]),
            "budget_s": args.budget_s, "complete": False, "stopped_by_budget": False, "environment": {},
            "timm": {}, "msda": [], "model": [], "train": [], "skipped": [], "provenance": run_provenance()}

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def add(self, section: str, row: dict[str, Any]) -> None:
        self.data[section].append(row)
        self.save()

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for path, text in ((self.path, json.dumps(self.data, indent=2, default=str)),
                           (self.markdown_path, markdown(self.data))):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text + "\n")
            tmp.replace(path)

    @property
    def markdown_path(self) -> Path:
        return self.path.with_suffix(".md")


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(data: dict[str, Any]) -> str:
    env = data.get("environment", {})
    lines = [f"# GPU check on {env.get('gpu') or env.get('cpu', '?')}", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, driver "
             f"{env.get('driver')}, compute capability {env.get('compute_capability')}; timm "
             f"{data.get('timm', {}).get('version')}; {data.get('elapsed_s')} s of a {data.get('budget_s')} s budget"
             f"{'' if data.get('complete') else ' (INCOMPLETE: stopped early)'}", "",
             "## MSDA op (paper shapes)", "",
             "| form | dtype | Lq | mode | p50 ms | speedup vs grid_sample | max err out | max err grad | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data.get("msda", []):
        lines.append(f"| {r['form']} | {r['dtype']} | {r['queries']} | {r['mode']} | {_fmt(r.get('p50_ms'), '.4f')} "
                     f"| {_fmt(r.get('speedup_vs_grid_sample'), '.2f')} | {_fmt(r.get('max_abs_err'), '.2e')} | "
                     f"{_fmt(r.get('max_abs_grad_err'), '.2e')} | {r['status']} |")
    lines += ["", "## Model inference", "", "| variant | batch | p50 ms | images/s | peak MiB | status |",
              "|---|---|---|---|---|---|"]
    for r in data.get("model", []):
        lines.append(f"| {r['variant']} | {r['batch']} | {_fmt(r.get('p50_ms'), '.2f')} | "
                     f"{_fmt(r.get('images_per_s'), '.1f')} | {_fmt(r.get('peak_mem_mb'), '.0f')} | {r['status']} |")
    lines += ["", "## Training step", "", "| batch | amp | loss | p50 ms | images/s | peak MiB | status |",
              "|---|---|---|---|---|---|---|"]
    for r in data.get("train", []):
        lines.append(f"| {r['batch']} | {r.get('amp')} | {r.get('loss')} | {_fmt(r.get('p50_ms'), '.1f')} | "
                     f"{_fmt(r.get('images_per_s'), '.2f')} | {_fmt(r.get('peak_mem_mb'), '.0f')} | {r['status']} |")
    if data.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(data["skipped"])]
    if data.get("errors"):
        lines += ["", "Errors: " + "; ".join(data["errors"])]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------------
def _module_version(name: str) -> str | None:
    try:
        module = __import__(name)
    except Exception:  # noqa: BLE001 - a missing or broken optional module is reported as absent
        return None
    return getattr(module, "__version__", "unknown")


def run_provenance() -> dict[str, Any]:
    """The results file's ``provenance`` (:mod:`sdconet.utils.provenance`: stdlib only, so a bare GPU machine has
    what it needs; outside a git checkout commit and dirty are null). A failure is recorded, never raised: it must
    not cost the GPU run its figures."""
    try:
        from sdconet.utils.provenance import provenance

        return provenance()
    except Exception as err:  # noqa: BLE001
        return {"error": f"{type(err).__name__}: {err}"}


def gpu_slug(name: str) -> str:
    """``nvidia-smi``'s GPU name as it goes into ``benchmarks/results/gpu_check_<gpu>.json``: lowercased, each run of
    non-alphanumerics one ``-`` (``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def environment_facts() -> dict[str, Any]:
    import torch

    from sdconet.benchmark.device import device_facts

    facts = device_facts()
    facts.update(python=platform.python_version(), triton=_module_version("triton"),
                 numpy=_module_version("numpy"), scipy=_module_version("scipy"))
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(compute_capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                     bf16_supported=torch.cuda.is_bf16_supported(),
                     results_file=f"benchmarks/results/gpu_check_{gpu_slug(props.name)}.json")
    return facts


def timm_status() -> dict[str, Any]:
    """Whether the model code imports with the timm installed here (its Swin blocks come from timm)."""
    try:
        installed = importlib.util.find_spec("timm") is not None
    except ValueError:  # sys.modules["timm"] is None: import blocked
        installed = False
    if not installed:
        return {"version": None, "usable": False,
                "error": "timm is not installed: the model rows need it (pip install timm)"}
    status: dict[str, Any] = {"version": _module_version("timm")}
    try:
        import sdconet.models  # noqa: F401  (imports timm.models.swin_transformer and timm.layers)
    except Exception as err:  # noqa: BLE001 - an API change in an unknown timm version shows up here
        status.update(usable=False, error=f"this timm ({status['version']}) does not fit the model code: "
                                          f"{type(err).__name__}: {err}")
        return status
    from sdconet.models.encoder import UnsupportedTimmError, check_timm_version

    try:  # the check the encoder makes when it is built: without it every model row would error one by one
        check_timm_version(status["version"])
    except UnsupportedTimmError as err:
        status.update(usable=False, error=str(err))
        return status
    status["usable"] = True
    return status


# ----------------------------------------------------------------------------------------------------------------
# Measurement helpers
# ----------------------------------------------------------------------------------------------------------------
class Budget:
    """Remaining time, and a hard stop: an alarm raises BudgetSpent if one measurement overruns the budget."""

    def __init__(self, seconds: float) -> None:
        self.started = time.monotonic()
        self.deadline = self.started + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def shortfall(self, seconds: float) -> str | None:
        """None when ``seconds`` are left, else the skip status of a row that needs them."""
        if self.left() >= seconds:
            return None
        return f"skipped: budget ({self.left():.0f} s left, needs ~{seconds:.0f} s)"

    @contextlib.contextmanager
    def hard_stop(self):
        def on_alarm(signum, frame):
            raise BudgetSpent("budget spent during a measurement")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, max(self.left(), 0.01))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def timed(fn: Callable[[], object], args: argparse.Namespace, budget: Budget, cuda: bool,
          share: float = 0.05) -> dict[str, float]:
    """p50/mean of ``fn`` after warm-up; the iteration count shrinks so a row takes at most ``share`` of the time
    left."""
    from sdconet.benchmark.timing import time_calls

    def once() -> float:
        started = time.perf_counter()
        fn()
        if cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter() - started

    first_s = once()  # compilation, autotuning, allocator growth
    per_call = max(once(), 1e-5)  # what a warm call costs: sizes the iteration count
    iters = max(3, min(args.iters, int(budget.left() * share / per_call)))
    warmup = min(args.warmup, iters)
    stats = time_calls(fn, warmup=warmup, iters=iters, cuda=cuda).summary(1)
    return {"p50_ms": stats["p50_ms"], "mean_ms": stats["mean_ms"], "iters": iters, "first_call_s": round(first_s, 3)}


def _load_msda_op():
    """benchmarks/msda_op.py (the op's input generator and form dispatch), loaded by path: it is a script."""
    spec = importlib.util.spec_from_file_location("sdconet_msda_op_bench", Path(__file__).with_name("msda_op.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure_row(row: dict[str, Any], make_call: Callable[[], Callable[[], object]], args: argparse.Namespace,
                budget: Budget, cuda: bool, batch: int, share: float) -> None:
    """Prepare (``make_call()``: capture, compile) and time one call into ``row``: latency, images/s, peak memory,
    ``status``. Any failure (capture, compile, out of memory) becomes the row's error status; only the budget's hard
    stop propagates."""
    try:
        with budget.hard_stop():
            _reset_peak(cuda)
            call = make_call()
            row.update(timed(call, args, budget, cuda, share=share))
            row["peak_mem_mb"] = _peak_mb(cuda)
            row["images_per_s"] = batch * 1000.0 / row["p50_ms"]
        row["status"] = "ok"
    except BudgetSpent:
        raise
    except Exception as err:  # noqa: BLE001 - one failing row is a finding, not the end of the check
        spent = budget_spent_in(err)
        if spent is not None:  # the alarm, wrapped (torch.compile): stop as budgeted, not a row error
            raise spent from err
        row["status"] = _error_status(err)


def budget_spent_in(err: BaseException) -> BudgetSpent | None:
    """The BudgetSpent behind ``err``: an alarm that fires inside torch.compile reaches us wrapped by Dynamo (e.g.
    ``InternalTorchDynamoError`` or ``BackendCompilerFailed``, the alarm as ``__cause__``/``__context__``)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, BudgetSpent):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__ or getattr(err, "inner_exception", None)
    return None


def _error_status(err: BaseException) -> str:
    first_line = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    return f"error: {type(err).__name__}: {first_line}"


def _peak_mb(cuda: bool) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if cuda else None


def _reset_peak(cuda: bool) -> None:
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------------------
def run_msda(report: Report, args: argparse.Namespace, budget: Budget, cuda: bool) -> None:
    import torch

    msda_op = _load_msda_op()
    device = torch.device("cuda" if cuda else "cpu")
    torch_dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    triton_skip = None if cuda else "skipped: the Triton kernel needs CUDA"
    if cuda:
        try:
            from sdconet.kernels import msda_triton  # noqa: F401  (registers impl "triton")
        except Exception as err:  # noqa: BLE001
            triton_skip = f"skipped: triton unavailable ({type(err).__name__}: {err})"
    floats = ("value", "sampling_locations", "attention_weights")
    for mode in ("fwd", "fwd+bwd"):
        for queries in MSDA_QUERIES:
            for dtype in MSDA_DTYPES:
                inputs = msda_op.make_inputs(1, queries, torch_dtypes[dtype], device, args.seed)
                reference_inputs = {k: (v.float() if k in floats else v) for k, v in inputs.items()}
                reference_out, reference_grads, grad_out = None, None, None
                rows: dict[str, dict[str, Any]] = {}
                for form in MSDA_FORMS:
                    row: dict[str, Any] = {"form": form, "dtype": dtype, "queries": queries, "mode": mode,
                                           "batch": 1, "device": device.type}
                    skip = triton_skip if form == "triton" else None
                    skip = skip or budget.shortfall(STEP_MIN_S["msda"] / 4)
                    if skip:
                        report.add("msda", row | {"status": skip})
                        continue
                    try:
                        with budget.hard_stop():
                            if mode == "fwd":
                                if reference_out is None:
                                    with torch.no_grad():
                                        reference_out = msda_op.form_call("grid_sample", reference_inputs)()
                                call = msda_op.form_call(form, inputs)
                                with torch.no_grad():
                                    _reset_peak(cuda)
                                    out = call()
                                    row["max_abs_err"] = float((out.float() - reference_out).abs().max())
                                    row.update(timed(lambda: call(), args, budget, cuda))
                            else:
                                if reference_grads is None:
                                    leaf = {k: (v.clone().requires_grad_() if k in floats else v) for k, v in
                                            reference_inputs.items()}
                                    out = msda_op.form_call("grid_sample", leaf)()
                                    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)
                                                           ).to(device)
                                    out.backward(grad_out)
                                    reference_grads = {k: leaf[k].grad for k in floats}
                                leaf = {k: (v.detach().clone().requires_grad_() if k in floats else v) for k, v in
                                        inputs.items()}
                                call = msda_op.form_call(form, leaf)
                                grad = grad_out.to(inputs["value"].dtype)

                                def step() -> None:
                                    for key in floats:
                                        leaf[key].grad = None
                                    call().backward(grad)

                                _reset_peak(cuda)
                                step()
                                row["max_abs_grad_err"] = max(float((leaf[k].grad.float() - reference_grads[k])
                                                                    .abs().max()) for k in floats)
                                row.update(timed(step, args, budget, cuda))
                        row["peak_mem_mb"] = _peak_mb(cuda)
                        row["status"] = "ok"
                    except BudgetSpent:
                        raise
                    except Exception as err:  # noqa: BLE001 - e.g. no half kernel here, a Triton compile error
                        if budget_spent_in(err) is not None:
                            raise budget_spent_in(err) from err
                        row["status"] = _error_status(err)
                    rows[form] = row
                    base = rows.get("grid_sample")
                    if row["status"] == "ok" and base and base["status"] == "ok" and row.get("p50_ms"):
                        row["speedup_vs_grid_sample"] = base["p50_ms"] / row["p50_ms"]
                    report.add("msda", row)


def _model_inputs(args: argparse.Namespace, batch: int, device):
    import torch

    generator = torch.Generator().manual_seed(args.seed)
    return torch.rand(batch, 3, args.imgsz, args.imgsz, generator=generator).to(device)


def _load_cfg(args: argparse.Namespace):
    from sdconet.config import load_config

    return load_config(args.config)


def run_model(report: Report, args: argparse.Namespace, budget: Budget, cuda: bool,
              variants: tuple[str, ...] = MODEL_VARIANTS) -> None:
    import torch

    from sdconet.engine.inference_graph import build_inference_graph
    from sdconet.ops.msda import resolve_msda_impl

    device = torch.device("cuda" if cuda else "cpu")
    cfg = _load_cfg(args)
    graph = build_inference_graph(cfg, None, msda_impl="auto").to(device).eval()
    amp = {"fp16": torch.float16, "bf16": torch.bfloat16}
    for variant in variants:
        kind = variant.split("_")[0]
        precision = variant.rsplit("_", 1)[-1]
        for batch in INFER_BATCHES:
            row: dict[str, Any] = {"variant": variant, "batch": batch, "config": cfg.name, "imgsz": args.imgsz,
                                   "msda_impl": resolve_msda_impl("auto", device)}
            needed = STEP_MIN_S["compile" if kind == "compile" else "cuda_graph" if kind == "cuda" else "model"]
            skip = None if cuda or variant == "eager_fp32" else "skipped: GPU only"
            skip = skip or budget.shortfall(needed)
            if skip:
                report.add("model", row | {"status": skip})
                continue
            images = _model_inputs(args, batch, device)
            measure_row(row, lambda: _inference_call(kind, graph, images, amp.get(precision)), args, budget, cuda,
                        batch, share=0.1)
            report.add("model", row)
            del images


def _inference_call(kind: str, graph, images, amp_dtype) -> Callable[[], object]:
    """A zero-argument callable running one inference of ``graph`` on ``images`` as ``kind`` says."""
    import torch

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        # no autocast weight cache under graph capture: cached casts would be freed under the graph (torch docs)
        return torch.autocast("cuda", dtype=amp_dtype, cache_enabled=kind != "cuda")

    if kind == "eager":
        def eager():
            with torch.no_grad(), autocast():
                return graph(images)
        return eager
    if kind == "compile":
        compiled = torch.compile(graph)

        def run_compiled():
            with torch.no_grad(), autocast():
                return compiled(images)
        return run_compiled
    if kind == "cuda":  # CUDA graph: capture one inference on a static input, replay it
        static = images.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad(), autocast():
            for _ in range(3):  # warm-up on a side stream, as capture requires
                graph(static)
        torch.cuda.current_stream().wait_stream(stream)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph), torch.no_grad(), autocast():
            graph(static)

        def replay():
            cuda_graph.replay()
        return replay
    raise ValueError(f"unknown inference kind {kind!r}")


def _synthetic_targets(batch: int, num_classes: int, hr_size: int, device, seed: int) -> list[dict]:
    """Per-image targets as the dataset yields them: ``labels [n]``, normalised cxcywh ``boxes [n, 4]``, HR
    ``size`` (H, W)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(batch):
        count = 20  # a typical remote-sensing patch holds tens of small objects
        centers = torch.rand(count, 2, generator=generator) * 0.8 + 0.1
        sizes = torch.rand(count, 2, generator=generator) * 0.08 + 0.02
        targets.append({"labels": torch.randint(0, num_classes, (count,), generator=generator).to(device),
                        "boxes": torch.cat([centers, sizes], dim=1).to(device),
                        "size": torch.tensor([hr_size, hr_size], dtype=torch.int64)})
    return targets


def _surrogate_loss(outputs) -> "object":
    """Sum of the means of every floating output tensor (nested lists/dicts included): gradients reach every
    parameter the real losses reach, without the matcher."""
    import torch

    total = None
    stack = [outputs]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, torch.Tensor) and item.is_floating_point() and item.requires_grad:
            term = item.float().mean()
            total = term if total is None else total + term
    if total is None:
        raise RuntimeError("the model's training outputs hold no tensor with gradients")
    return total


def run_train(report: Report, args: argparse.Namespace, budget: Budget, cuda: bool) -> None:
    import torch

    from sdconet.models import build_model

    device = torch.device("cuda" if cuda else "cpu")
    cfg = _load_cfg(args)
    try:
        from sdconet.losses import SetCriterion

        criterion = SetCriterion.from_config(cfg).to(device)
        loss_kind = "SetCriterion (matching, detection, saliency, SR)"
    except ImportError as err:  # scipy (Hungarian matcher) or torchvision (focal/GIoU losses) missing
        criterion, loss_kind = None, f"surrogate (real losses unavailable: {err})"
    # AMP as training runs on a GPU (train.amp auto); the CPU self-test uses bf16 too, to exercise the same path
    amp_dtype = torch.bfloat16 if not cuda or torch.cuda.is_bf16_supported() else torch.float16
    model = build_model(cfg.model).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    upscale = cfg.model.upscale
    for batch in TRAIN_BATCHES:
        row: dict[str, Any] = {"batch": batch, "config": cfg.name, "imgsz": args.imgsz, "loss": loss_kind,
                               "amp": {None: "none (fp32)", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]}
        skip = budget.shortfall(STEP_MIN_S["train"])
        if skip:
            report.add("train", row | {"status": skip})
            continue
        images = _model_inputs(args, batch, device)
        images_hr = torch.nn.functional.interpolate(images, scale_factor=upscale, mode="bilinear")
        targets = _synthetic_targets(batch, cfg.model.detector.num_classes, args.imgsz * upscale, device, args.seed)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            context = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
            with context:
                outputs = model(images, None, targets, run_sr=True)
            if criterion is not None:
                loss = criterion(outputs, targets, images_hr, None)["loss"]
            else:
                loss = _surrogate_loss(outputs)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

        measure_row(row, lambda: step, args, budget, cuda, batch, share=0.15)
        report.add("train", row)
        del images, images_hr, targets
        if cuda:
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # the clock starts before `import torch` (seconds on a cold machine) so the budget bounds the whole process
    budget = Budget(args.budget_s)
    import torch

    cuda = torch.cuda.is_available() and args.device == "auto"
    plan = build_plan(args)
    if not cuda and args.device == "auto":
        document = {"command": " ".join(["gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
                    "complete": False, "ran": False,
                    "reason": "no CUDA device (torch.cuda.is_available() is False): nothing measured; this is the "
                              "plan", "budget_s": args.budget_s, "plan": plan, "provenance": run_provenance()}
        print(f"GPU check plan ({len(plan)} rows, budget {args.budget_s:.0f} s); no CUDA device here, so nothing "
              f"is measured:")
        for row in plan:
            print("  " + ", ".join(f"{k}={v}" for k, v in row.items()))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"plan written to {args.json}")
        return 0

    report = Report(args.json, args, started=budget.started)
    report.data["plan_rows"] = len(plan)
    report.data["environment"] = environment_facts()
    report.data["timm"] = timm_status()
    report.save()
    def runner(name: str, variants: tuple[str, ...]) -> Callable[..., None]:
        if name in ("model", "compile"):
            return lambda *a: run_model(*a, variants=variants)
        return {"msda": run_msda, "train": run_train}[name]

    steps = [(name, runner(name, variants)) for name, variants in RUN_ORDER if name in args.steps]
    if not report.data["timm"]["usable"]:
        needs_model = [name for name, _ in steps if name != "msda"]
        if needs_model:
            report.data["skipped"].append(f"{', '.join(needs_model)}: {report.data['timm']['error']}")
        steps = [(name, step) for name, step in steps if name == "msda"]
    for name, step in steps:
        try:
            step(report, args, budget, cuda)
        except Exception as err:  # noqa: BLE001 - a step that cannot even start (model build, OOM) is recorded
            spent = budget_spent_in(err)
            if spent is None:
                report.data.setdefault("errors", []).append(f"{name}: {_error_status(err)}")
                report.save()
                continue
            report.data["stopped_by_budget"] = True
            report.data["skipped"].append(f"{name} and later steps: {spent}")
            break
    budget_skips = sum(str(row.get("status", "")).startswith("skipped: budget")
                       for section in ("msda", "model", "train") for row in report.data[section])
    if budget_skips:
        report.data["skipped"].append(f"{budget_skips} rows: not enough budget left")
    # complete = every planned row was measured or is impossible here (no GPU, no timm), none lost to the budget
    report.data["complete"] = (not report.data["stopped_by_budget"] and not budget_skips
                               and not report.data.get("errors"))
    report.save()  # the JSON and the markdown, final
    print(markdown(report.data))
    print(f"\nJSON: {args.json}  markdown: {args.json.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
