"""INT8 by explicit quantization: Q/DQ ONNX from NVIDIA ModelOpt's ONNX PTQ, and its COCO AP on CPU.

ModelOpt (``nvidia-modelopt[onnx]``) pulls ``onnxruntime-gpu``, cupy and an older ``onnx``, so it lives in its own
virtualenv and runs as a subprocess::

    <python> -m modelopt.onnx.quantization --onnx_path fp32.onnx --quantize_mode int8
        --calibration_data_path calib.npz --calibration_eps cpu --high_precision_dtype fp32|fp16
        --output_path int8.onnx

The interpreter is, in order: the ``python`` argument (``--modelopt-python``), ``$SDCONET_MODELOPT_PYTHON``, then
``.venv-modelopt/bin/python`` in the repository root (docs/export.md shows how to create it).

Calibration always runs on the pure-ONNX graph (ONNX Runtime CPU cannot execute TensorRT plugins). Its MSDA
subgraphs (``msda_onnx<i>/...``) are excluded from quantization so that the plugin nodes can be swapped in afterwards
(:func:`sdconet.deploy.msda_plugin.onnx_msda_to_plugin_nodes`); the plugin runs in FP32/FP16 anyway.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sdconet.utils.logging import get_logger

LOG = get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELOPT_PYTHON_ENV = "SDCONET_MODELOPT_PYTHON"
DEFAULT_MODELOPT_PYTHON = REPO_ROOT / ".venv-modelopt" / "bin" / "python"
_PROBED: dict[str, None] = {}  # interpreters whose ModelOpt import succeeded


class QuantizationError(RuntimeError):
    """ModelOpt is missing or failed; the message says which and how to fix it."""


def modelopt_python(explicit: str | Path | None = None) -> Path:
    """The interpreter that has ModelOpt (argument > $SDCONET_MODELOPT_PYTHON > .venv-modelopt)."""
    return Path(explicit or os.environ.get(MODELOPT_PYTHON_ENV) or DEFAULT_MODELOPT_PYTHON)


def modelopt_unavailable_reason(python: str | Path | None = None) -> str | None:
    """None when ``python -m modelopt.onnx.quantization`` can run, else why not (for skip messages and the report)."""
    interpreter = modelopt_python(python)
    if not interpreter.exists():
        return (f"ModelOpt interpreter {interpreter} not found (create it as in docs/export.md, or set "
                f"{MODELOPT_PYTHON_ENV})")
    key = str(interpreter)
    if key in _PROBED:  # the probe imports ModelOpt (~10 s): a success is remembered per interpreter and process
        return None
    probe = subprocess.run([str(interpreter), "-c", "import modelopt.onnx.quantization"], capture_output=True,
                           text=True, timeout=600)
    if probe.returncode != 0:  # not cached: installing ModelOpt meanwhile must be seen by the next call
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return f"{interpreter} cannot import modelopt.onnx.quantization: {last}"
    _PROBED[key] = None
    return None


def fit_to_input(image: torch.Tensor, imgsz: int) -> torch.Tensor:
    """``[3, h, w]`` LR image -> ``[3, imgsz, imgsz]`` (bilinear resize when the size differs; boxes are mapped
    back per axis by the caller)."""
    if tuple(image.shape[-2:]) == (imgsz, imgsz):
        return image
    return F.interpolate(image[None], size=(imgsz, imgsz), mode="bilinear", align_corners=False)[0].clamp(0, 1)


def _warn_on_resize(image: torch.Tensor, imgsz: int, what: str) -> None:
    if tuple(image.shape[-2:]) != (imgsz, imgsz):
        LOG.warning("%s: dataset LR images are %dx%d, the graph takes %dx%d: images are resized, so the model sees "
                    "objects at another scale than in training (export with --imgsz %d to match)", what,
                    image.shape[-2], image.shape[-1], imgsz, imgsz, image.shape[-1])


DEFAULT_CALIB_IMAGES = 256  # calibration inputs of every INT8 path (issue 21: >= 256, augmented when fewer)
CALIB_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _augmented_view(image: torch.Tensor, imgsz: int, rng: np.random.Generator) -> torch.Tensor:
    """One augmented crop of a ``[3, h, w]`` LR image at ``imgsz``: the training augmentations (flips, a 90 degree
    turn) and a random crop of 70-100 % of the side, resized back (object scale changes by at most 1/0.7)."""
    if rng.random() < 0.5:
        image = image.flip(-1)
    if rng.random() < 0.5:
        image = image.flip(-2)
    image = torch.rot90(image, int(rng.integers(4)), dims=(-2, -1))
    h, w = image.shape[-2:]
    side = max(8, int(round(min(h, w) * rng.uniform(0.7, 1.0))))
    top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
    crop = image[:, top:top + side, left:left + side]
    return F.interpolate(crop[None], size=(imgsz, imgsz), mode="bilinear", align_corners=False)[0]


def calibration_images(dataset, count: int = DEFAULT_CALIB_IMAGES, imgsz: int = 128, seed: int = 0
                       ) -> np.ndarray:
    """``count`` LR images (``[N, 3, imgsz, imgsz]`` float32, about [0, 1]) drawn reproducibly from ``dataset``.

    Every image is used once (in a seeded order); when the split has fewer than ``count`` images the rest are
    augmented crops of them (:func:`_augmented_view`), so a small training split still calibrates on ``count``
    distinct inputs.
    """
    if count < 1:
        raise ValueError(f"--calib-images must be >= 1, got {count}")
    if len(dataset) == 0:
        raise ValueError("the calibration dataset is empty")
    generator = np.random.default_rng(seed)
    indices = generator.permutation(len(dataset))[:count]
    _warn_on_resize(dataset[int(indices[0])]["image_lr"], imgsz, "calibration")
    images = [fit_to_input(dataset[int(i)]["image_lr"], imgsz) for i in tqdm(indices, desc="calibration images")]
    extra = count - len(images)
    if extra > 0:
        LOG.info("calibration: %d training images, %d augmented crops of them to reach %d inputs", len(images),
                 extra, count)
        for _ in range(extra):
            source = dataset[int(generator.integers(len(dataset)))]["image_lr"]
            images.append(_augmented_view(source, imgsz, generator))
    return torch.stack(images).numpy().astype(np.float32)


def calibration_images_from_dir(directory: str | Path, count: int = DEFAULT_CALIB_IMAGES, imgsz: int = 128,
                                seed: int = 0) -> np.ndarray:
    """``count`` calibration inputs from the user's own images in ``directory`` (``--calib-dir``): images the
    network would be given (LR pixels), taken as random ``imgsz`` crops (resized up when smaller), round-robin over
    the files so that every file contributes."""
    from sdconet.data.image_io import load_image

    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"--calib-dir {directory}: not a directory")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in CALIB_EXTENSIONS)
    if not files:
        raise ValueError(f"--calib-dir {directory}: no image files ({', '.join(CALIB_EXTENSIONS)})")
    if count < 1:
        raise ValueError(f"--calib-images must be >= 1, got {count}")
    generator = np.random.default_rng(seed)
    images = []
    for k in tqdm(range(count), desc="calibration images"):
        path = files[k % len(files)]
        try:
            array = load_image(path)
        except Exception as err:  # noqa: BLE001 - a named error for the file that cannot be read
            raise ValueError(f"--calib-dir: cannot read {path}: {err}") from err
        image = torch.from_numpy(np.ascontiguousarray(array[..., :3])).permute(2, 0, 1).float() / 255.0
        h, w = image.shape[-2:]
        if min(h, w) < imgsz:
            image = F.interpolate(image[None], size=(max(h, imgsz), max(w, imgsz)), mode="bilinear",
                                  align_corners=False)[0]
            h, w = image.shape[-2:]
        top, left = int(generator.integers(h - imgsz + 1)), int(generator.integers(w - imgsz + 1))
        images.append(image[:, top:top + imgsz, left:left + imgsz])
    return torch.stack(images).numpy().astype(np.float32)


def write_calibration_data(images: np.ndarray, path: str | Path, input_name: str = "images") -> Path:
    """ModelOpt's ``--calibration_data_path`` format: an npz keyed by graph input name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{input_name: images})
    return path


def quantize_int8(onnx_path: str | Path, output_path: str | Path, calibration_path: str | Path, *,
                  python: str | Path | None = None, exclude_nodes: Sequence[str] = (),
                  calibration_method: str = "entropy", high_precision_dtype: str = "fp32",
                  op_types_to_quantize: Sequence[str] | None = None, op_types_to_exclude: Sequence[str] = (),
                  log_path: str | Path | None = None, timeout_s: int = 3600) -> dict:
    """Run ModelOpt INT8 PTQ (CPU calibration) and return a summary (command, seconds, Q/DQ node count).

    ``high_precision_dtype`` is the type of the layers left unquantized: ``fp16`` for TensorRT 11 targets (strongly
    typed, so those layers run in exactly this type), ``fp32`` where TensorRT 10's FP16 flag lowers them anyway.
    """
    if high_precision_dtype not in ("fp16", "fp32"):
        raise ValueError(f"high_precision_dtype must be 'fp16' or 'fp32', got {high_precision_dtype!r}")
    import onnx

    reason = modelopt_unavailable_reason(python)
    if reason:
        raise QuantizationError(reason)
    output_path = Path(output_path)
    command = [str(modelopt_python(python)), "-m", "modelopt.onnx.quantization", "--onnx_path", str(onnx_path),
               "--quantize_mode", "int8", "--calibration_method", calibration_method,
               "--calibration_data_path", str(calibration_path), "--calibration_eps", "cpu",
               "--high_precision_dtype", high_precision_dtype, "--output_path", str(output_path)]
    if exclude_nodes:
        command += ["--nodes_to_exclude", *exclude_nodes]
    if op_types_to_quantize:
        command += ["--op_types_to_quantize", *op_types_to_quantize]
    if op_types_to_exclude:
        command += ["--op_types_to_exclude", *op_types_to_exclude]
    LOG.info("ModelOpt INT8 PTQ: %s", " ".join(command))
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    seconds = time.perf_counter() - start
    if log_path is not None:
        Path(log_path).write_text(result.stdout + result.stderr)
    if result.returncode != 0 or not output_path.exists():
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise QuantizationError(f"ModelOpt INT8 quantization failed (exit {result.returncode}):\n{tail}")
    model = onnx.load(str(output_path), load_external_data=False)
    q_nodes = sum(node.op_type == "QuantizeLinear" for node in model.graph.node)
    dq_nodes = sum(node.op_type == "DequantizeLinear" for node in model.graph.node)
    if not dq_nodes:
        raise QuantizationError(f"ModelOpt wrote {output_path} without any DequantizeLinear node")
    return {"command": command, "seconds": round(seconds, 1), "quantize_linear": q_nodes,
            "dequantize_linear": dq_nodes, "calibration_method": calibration_method,
            "high_precision_dtype": high_precision_dtype}


def coco_detections(item: dict, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, label_to_category_id,
                    imgsz: int) -> list[dict]:
    """One image's detector outputs (``boxes [K, 4]`` xyxy network-input pixels) as COCO detections in the HR
    pixels of the annotation file."""
    target = item["target"]
    image_id = int(target["image_id"])
    height, width = (float(s) for s in target["orig_size"])
    xyxy = boxes.astype(np.float64) * (np.array([width, height, width, height]) / imgsz)
    xyxy[:, 0::2] = xyxy[:, 0::2].clip(0, width)
    xyxy[:, 1::2] = xyxy[:, 1::2].clip(0, height)
    return [{"image_id": image_id, "category_id": int(label_to_category_id[int(label)]),
             "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": float(score)}
            for box, score, label in zip(xyxy, scores, labels)]


def run_dataset(model, dataset, imgsz: int, limit: int | None = None, batch_size: int = 4,
                desc: str = "ONNX Runtime eval") -> tuple[list[dict[str, np.ndarray]], list[dict], list[int]]:
    """Run ``model`` over the first ``limit`` images of ``dataset``: per-image outputs (``boxes`` ``[K, 4]`` xyxy
    network-input pixels, ``scores``, ``labels``), COCO detections (HR pixels of the annotation file) and the
    image ids. ``model``: an ONNX model (path or ModelProto, run on ONNX Runtime CPU) or any
    ``sdconet.runtime.Runner``."""
    from sdconet.runtime.base import Runner

    if isinstance(model, Runner):
        run = model.run
        batch_size = min(batch_size, model.max_batch or batch_size)
    else:
        from sdconet.runtime.onnxruntime_runner import ort_session

        session = ort_session(model)
        input_name = session.get_inputs()[0].name

        def run(images):
            return dict(zip(("boxes", "scores", "labels"),
                            session.run(["boxes", "scores", "labels"], {input_name: images})))
    count = len(dataset) if limit is None else min(limit, len(dataset))
    per_image: list[dict[str, np.ndarray]] = []
    detections: list[dict] = []
    image_ids: list[int] = []
    for start in tqdm(range(0, count, batch_size), desc=desc):
        items = [dataset[i] for i in range(start, min(start + batch_size, count))]
        if start == 0:
            _warn_on_resize(items[0]["image_lr"], imgsz, desc)
        outputs = run(torch.stack([fit_to_input(item["image_lr"], imgsz) for item in items]).numpy())
        for i, item in enumerate(items):
            image = {key: np.asarray(outputs[key][i]) for key in ("boxes", "scores", "labels")}
            per_image.append(image)
            image_ids.append(int(item["target"]["image_id"]))
            detections += coco_detections(item, image["boxes"], image["scores"], image["labels"],
                                          dataset.label_to_category_id, imgsz)
    return per_image, detections, image_ids


def predict_dataset(model, dataset, imgsz: int, limit: int | None = None, batch_size: int = 4,
                    desc: str = "ONNX Runtime eval") -> tuple[list[dict], list[int]]:
    """COCO detections (HR pixels of the annotation file) of ``model`` (ONNX model or Runner, as in
    :func:`run_dataset`) over the first ``limit`` images of ``dataset``; returns (detections, image ids)."""
    _, detections, image_ids = run_dataset(model, dataset, imgsz, limit, batch_size, desc)
    return detections, image_ids


def evaluate_ap(model, dataset, imgsz: int, limit: int | None = None, desc: str = "ONNX Runtime eval"
                ) -> dict[str, float]:
    """COCO box AP of an ONNX model (path or ModelProto) on the first ``limit`` images of ``dataset``."""
    from sdconet.engine.metrics import coco_evaluate

    detections, image_ids = predict_dataset(model, dataset, imgsz, limit, desc=desc)
    return coco_evaluate(dataset.ann_file, detections, image_ids=image_ids)


def compare_int8_ap(fp32_model, int8_model, dataset, imgsz: int, limit: int | None = None) -> dict:
    """FP32 vs INT8 COCO AP (a benchmark figure: the target drop is <= 1 AP point, not a test threshold)."""
    fp32 = evaluate_ap(fp32_model, dataset, imgsz, limit, "FP32 ONNX eval")
    int8 = evaluate_ap(int8_model, dataset, imgsz, limit, "INT8 ONNX eval")
    drop = (fp32["AP"] - int8["AP"]) * 100.0
    images = len(dataset) if limit is None else min(limit, len(dataset))
    return {"fp32": fp32, "int8": int8, "ap_drop_points": round(drop, 3), "target_drop_points": 1.0,
            "images": images, "within_target": bool(drop <= 1.0)}


def autocast_fp16(onnx_path: str | Path, output_path: str | Path, calibration_path: str | Path | None = None, *,
                  python: str | Path | None = None, exclude_nodes: Sequence[str] = (),
                  log_path: str | Path | None = None, timeout_s: int = 3600) -> dict:
    """ModelOpt AutoCast FP32 -> mixed FP16 ONNX (the TensorRT 11 FP16 input; I/O types kept, CPU reference run)."""
    reason = modelopt_unavailable_reason(python)
    if reason:
        raise QuantizationError(reason)
    output_path = Path(output_path)
    command = [str(modelopt_python(python)), "-m", "modelopt.onnx.autocast", "--onnx_path", str(onnx_path),
               "--output_path", str(output_path), "--low_precision_type", "fp16", "--keep_io_types",
               "--providers", "cpu"]
    if calibration_path is not None:
        command += ["--calibration_data", str(calibration_path)]
    if exclude_nodes:
        command += ["--nodes_to_exclude", *exclude_nodes]
    LOG.info("ModelOpt AutoCast FP16: %s", " ".join(command))
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if log_path is not None:
        Path(log_path).write_text(result.stdout + result.stderr)
    if result.returncode != 0 or not output_path.exists():
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise QuantizationError(f"ModelOpt AutoCast failed (exit {result.returncode}):\n{tail}")
    return {"command": command, "seconds": round(time.perf_counter() - start, 1)}
