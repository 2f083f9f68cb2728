"""Facts about the machine a benchmark ran on, recorded next to every figure."""
from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

from sdconet.utils.cpu import cpu_model_name


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "unknown")
    except Exception:  # an optional runtime that is missing or broken is just "not present"
        return None


def _jetson_facts() -> dict[str, Any]:
    """Jetson model, L4T release and power mode (empty dict elsewhere)."""
    facts: dict[str, Any] = {}
    model_file = Path("/proc/device-tree/model")
    if model_file.exists():
        facts["jetson_model"] = model_file.read_text(errors="ignore").strip("\x00\n ")
    release = Path("/etc/nv_tegra_release")
    if release.exists():
        text = release.read_text(errors="ignore")
        match = re.search(r"R(\d+).*REVISION:\s*([\d.]+)", text)
        facts["l4t_release"] = f"{match.group(1)}.{match.group(2)}" if match else text.splitlines()[0]
    if facts:
        try:
            out = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=10).stdout
            facts["power_mode"] = " ".join(out.split())
        except (OSError, subprocess.SubprocessError):
            facts["power_mode"] = "unknown (nvpmodel not runnable)"
    return facts


def device_facts() -> dict[str, Any]:
    """CPU model/threads, GPU name/driver, CUDA/cuDNN, torch/ORT/TensorRT versions, Jetson details."""
    import torch

    from sdconet.utils.tensorrt import tensorrt_version  # the one TensorRT import guard

    facts: dict[str, Any] = {
        "cpu": cpu_model_name(),
        "cpu_threads": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": _version("onnxruntime"),
        "tensorrt": tensorrt_version(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                     cudnn=torch.backends.cudnn.version())
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
            facts["driver"] = out.splitlines()[0] if out else None
        except (OSError, subprocess.SubprocessError):
            facts["driver"] = None
    facts.update(_jetson_facts())
    return facts


def describe(facts: dict[str, Any]) -> str:
    """One line naming the device a record ran on."""
    if facts.get("gpu"):
        return f"{facts['gpu']} (CUDA {facts.get('cuda')}, driver {facts.get('driver')})"
    return f"{facts['cpu']} ({facts['torch_threads']} threads)"
