"""benchmarks/gpu_check.py: the plan on a machine without CUDA, the budget stop, the partial JSON, the report, and the
import chain a bare GPU machine (torch, triton, numpy, timm; no onnx/onnxruntime/pycocotools/scipy) can satisfy."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(),
                             reason="a CUDA device is present: the script would run the full check, not the plan")


def _run(*args: str, timeout: int = 170) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@no_cuda
def test_without_cuda_prints_and_writes_the_plan(tmp_path):
    out = tmp_path / "plan" / "gpu_check.json"
    result = _run("--json", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no CUDA device here, so nothing is measured" in result.stdout
    assert "variant=compile_amp_fp16, batch=8" in result.stdout
    document = json.loads(out.read_text())
    assert document["ran"] is False and document["budget_s"] == 240.0
    steps = [row["step"] for row in document["plan"]]
    # 2 modes x 2 query counts x 3 dtypes x 3 forms; 5 variants x 2 batches; 2 training batches
    assert steps.count("msda") == 36 and steps.count("model") == 10 and steps.count("train") == 2
    assert {row["dtype"] for row in document["plan"] if row["step"] == "msda"} == {"fp32", "fp16", "bf16"}


def test_budget_stop_leaves_a_partial_report(tmp_path):
    """A budget below one MSDA row's minimum (5 s / 4): every row is skipped for the budget whatever the CPU's speed,
    and the report says it is incomplete. (No wall-clock bound here: the subprocess timeout only guards a hang.)"""
    out = tmp_path / "check.json"
    result = _run("--device", "cpu", "--steps", "msda", "--budget-s", "1", "--iters", "3", "--json", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["complete"] is False and len(data["msda"]) == 36
    assert not [row for row in data["msda"] if row["status"] == "ok"]
    # the 12 Triton rows (CUDA only) skip for that reason, the 24 CPU rows for the budget
    assert all(row["status"].startswith("skipped: the Triton kernel needs CUDA" if row["form"] == "triton"
                                       else "skipped: budget")
               for row in data["msda"]), [row["status"] for row in data["msda"]]
    assert "INCOMPLETE" in out.with_suffix(".md").read_text()


def test_hard_stop_interrupts_a_measurement_that_overruns():
    gpu_check = _load()
    budget = gpu_check.Budget(0.3)
    # an uninterrupted 60 s sleep would return normally: BudgetSpent raised from inside it is the interruption
    with pytest.raises(gpu_check.BudgetSpent, match="budget spent during a measurement"):
        with budget.hard_stop():
            time.sleep(60)
    assert budget.shortfall(1.0).startswith("skipped: budget")
    assert gpu_check.Budget(60).shortfall(1.0) is None


def test_report_is_rewritten_after_every_row_and_renders(tmp_path):
    gpu_check = _load()
    args = gpu_check.parse_args(["--json", str(tmp_path / "r.json")])
    report = gpu_check.Report(args.json, args)
    report.add("msda", {"form": "triton", "dtype": "fp16", "queries": 898, "mode": "fwd", "p50_ms": 0.05,
                        "speedup_vs_grid_sample": 6.2, "max_abs_err": 1e-3, "status": "ok"})
    on_disk = json.loads(args.json.read_text())
    assert on_disk["complete"] is False and on_disk["msda"][0]["speedup_vs_grid_sample"] == 6.2
    report.add("train", {"batch": 8, "amp": "bf16", "loss": "SetCriterion", "p50_ms": 410.0, "images_per_s": 19.5,
                         "peak_mem_mb": 30000.0, "status": "ok"})
    text = gpu_check.markdown(json.loads(args.json.read_text()))
    assert "| triton | fp16 | 898 | fwd | 0.0500 | 6.20 | 1.00e-03 | - | ok |" in text
    assert "| 8 | bf16 | SetCriterion | 410.0 | 19.50 | 30000 | ok |" in text


def test_bad_arguments_are_refused():
    result = _run("--budget-s", "0")
    assert result.returncode == 2 and "--budget-s must be positive" in result.stderr


def test_missing_timm_is_reported(monkeypatch):
    gpu_check = _load()
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` fail like an absent package
    status = gpu_check.timm_status()
    assert status == {"version": None, "usable": False,
                      "error": "timm is not installed: the model rows need it (pip install timm)"}


_IMPORT_CHAIN = r"""
import sys
from importlib.machinery import PathFinder
# absent on the GPU machine (PIL and tqdm stay: torchvision and huggingface_hub, timm's own dependencies, need them)
BLOCKED = ("onnx", "onnxruntime", "onnxsim", "pycocotools", "scipy", "tensorrt", "tritonclient", "openvino",
           "rasterio", "cv2")

class Hiding(PathFinder):
    # the blocked packages look uninstalled: find_spec says None, import raises ModuleNotFoundError
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return None
        return PathFinder.find_spec(name, path, target)

sys.meta_path[:] = [Hiding if finder is PathFinder else finder for finder in sys.meta_path]
import importlib.util
spec = importlib.util.spec_from_file_location("gpu_check", sys.argv[1])
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)
assert gpu_check.timm_status()["usable"], gpu_check.timm_status()
import sdconet.kernels.msda_triton, sdconet.engine.inference_graph, sdconet.benchmark.timing  # noqa
gpu_check._load_msda_op()
gpu_check.environment_facts()
try:
    from sdconet.losses import SetCriterion  # noqa: F401
    print("criterion importable")
except ImportError as err:
    print("criterion unavailable:", err)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print("LEAKED", leaked)
"""


def test_the_check_imports_only_torch_triton_numpy_timm(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", _IMPORT_CHAIN, str(SCRIPT)], capture_output=True, text=True,
                            cwd=REPO_ROOT, env=env, timeout=170)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LEAKED []" in result.stdout
    # without scipy the training rows fall back to the surrogate loss (ImportError is what run_train catches)
    assert "criterion unavailable" in result.stdout


def test_unsupported_timm_version_skips_the_model_rows_up_front(monkeypatch):
    """A newer timm imports fine but is outside the encoder's tested range: the check says so once, before any model
    row, instead of every model/training/compile row erroring."""
    import timm

    from sdconet.models.encoder import SUPPORTED_TIMM

    gpu_check = _load()
    monkeypatch.setattr(timm, "__version__", SUPPORTED_TIMM[1] + ".0")
    status = gpu_check.timm_status()
    assert status["usable"] is False and status["version"] == SUPPORTED_TIMM[1] + ".0"
    assert f"timm>={SUPPORTED_TIMM[0]},<{SUPPORTED_TIMM[1]}" in status["error"]


def test_budget_alarm_wrapped_by_torch_compile_stops_the_check():
    """The alarm fires inside a (deliberately slow) compiler backend: Dynamo re-raises it as its own exception, and
    measure_row must still stop as budgeted rather than record a row error and go on."""
    gpu_check = _load()
    torch._dynamo.reset()

    def slow_backend(graph_module, example_inputs):
        time.sleep(60)  # interrupted by the budget's alarm
        return graph_module.forward

    compiled = torch.compile(lambda x: x * 2 + 1, backend=slow_backend)
    args = gpu_check.parse_args(["--device", "cpu", "--iters", "1", "--warmup", "1"])
    row: dict = {}
    with pytest.raises(gpu_check.BudgetSpent):
        gpu_check.measure_row(row, lambda: (lambda: compiled(torch.ones(4))), args, gpu_check.Budget(1.0),
                              cuda=False, batch=1, share=1.0)
    assert "status" not in row
    torch._dynamo.reset()


def test_markdown_is_rewritten_after_every_row(tmp_path):
    gpu_check = _load()
    args = gpu_check.parse_args(["--json", str(tmp_path / "r.json")])
    report = gpu_check.Report(args.json, args)
    report.add("model", {"variant": "eager_fp32", "batch": 1, "p50_ms": 12.5, "images_per_s": 80.0,
                         "peak_mem_mb": 900.0, "status": "ok"})
    text = (tmp_path / "r.md").read_text()
    assert "| eager_fp32 | 1 | 12.50 | 80.0 | 900 | ok |" in text and "INCOMPLETE" in text
    report.add("model", {"variant": "eager_fp32", "batch": 8, "status": "error: OutOfMemoryError: CUDA"})
    assert "| eager_fp32 | 8 | - | - | - | error: OutOfMemoryError: CUDA |" in (tmp_path / "r.md").read_text()


def test_budget_clock_starts_before_import_torch(tmp_path, monkeypatch):
    """Seconds of `import torch` on a cold machine count against the budget: the order of the two events in main()."""
    import builtins

    gpu_check = _load()
    events: list[str] = []
    real_import = builtins.__import__

    def recording_import(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            events.append("import torch")
        return real_import(name, *args, **kwargs)

    class RecordingBudget(gpu_check.Budget):
        def __init__(self, seconds: float) -> None:
            events.append("budget")
            super().__init__(seconds)

    monkeypatch.setattr(gpu_check, "Budget", RecordingBudget)
    monkeypatch.setattr(builtins, "__import__", recording_import)
    assert gpu_check.main(["--device", "cpu", "--steps", "msda", "--budget-s", "0.5", "--json",
                           str(tmp_path / "c.json")]) == 0
    monkeypatch.setattr(builtins, "__import__", real_import)
    assert events[:2] == ["budget", "import torch"], events[:5]


def test_documented_device_commands_use_python3():
    """The lent GPU machine has `python3`, not `python`: a documented command must run there as written."""
    for path in (REPO_ROOT / "docs" / "gpu-and-jetson.md", SCRIPT):
        lines = [line for line in path.read_text().splitlines() if "benchmarks/gpu_check.py --" in line]
        assert lines, path
        assert all("python3 benchmarks/gpu_check.py" in line for line in lines), (path, lines)


def test_results_file_name_rule():
    gpu_check = _load()
    assert gpu_check.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert gpu_check.gpu_slug("NVIDIA H200") == "nvidia-h200"
    assert gpu_check.gpu_slug("Orin (nvgpu)") == "orin-nvgpu"
