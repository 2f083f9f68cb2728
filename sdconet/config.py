"""The one configuration system: typed dataclasses, YAML files, dotted command-line overrides.

A config file is a YAML mapping that mirrors :class:`Config`. It may name a ``base`` (a preset name such as
``paper``/``tiny`` or another YAML path) whose values it updates. Overrides are ``section.field=value`` strings whose
value is parsed as YAML (``train.epochs=3``, ``model.saliency.level_ratio=[0.5,0.8,1,1]``).

Unknown keys and values of the wrong type are errors that name the file and the dotted key.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

PRESET_DIR = Path(__file__).parent / "configs"
DEFAULT_TRAINING_TILE = 512  # HR pixels: the -Split datasets' window (DESIGN §4) when the run's image size is unknown


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file/key/value."""


# --------------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class EncoderConfig:
    """Shared Swin encoder (timm ``features_only``; strides 4/8/16/32)."""

    name: str = "swin_tiny_patch4_window7_224"
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    drop_path_rate: float = 0.2
    pretrained_file: Optional[str] = None  # local ImageNet checkpoint; random init when None
    out_norm: bool = False  # one LayerNorm per stage output (mmdet Swin, official code); False = raw timm outputs


@dataclass
class NeckConfig:
    """1x1 conv + GN on s8/s16/s32 encoder features, plus one 3x3 s2 conv -> 4 levels (LR strides 8/16/32/64)."""

    channels: int = 256
    num_levels: int = 4
    num_groups: int = 32


@dataclass
class SRDecoderConfig:
    """U-Net style SR decoder with Swin refinement stages (training only; never exported)."""

    embed_dim: int = 192  # lighter than the official 768 (22.06 M params in our layout, measured); docs/model.md
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (6, 6, 6, 6)
    window_size: int = 7
    # widths of the 4 Swin stages, deepest first; None = (embed_dim, /2, /4, /4). The official SRNet halves every
    # stage: (768, 384, 192, 96)
    stage_widths: Optional[tuple[int, ...]] = None
    mlp_ratio: float = 4.0  # Swin block MLP width / stage width (the official SRNet: 2)


@dataclass
class SaliencyConfig:
    """Saliency predictor, hierarchical token filtering and saliency supervision."""

    enabled: bool = True
    level_ratio: tuple[float, ...] = (0.6, 0.8, 1.0, 1.0)  # finest level first
    layer_ratio: tuple[float, ...] = (1.0, 0.8, 0.6, 0.6, 0.4, 0.2)  # one per encoder layer
    foreground_topk: int = 100  # tokens in each layer's foreground self-attention
    hidden_dim: int = 256
    alpha_init_range: float = 0.3  # top-down modulation alpha ~ U(-r, r)
    target_mode: str = "gaussian"  # "gaussian" (paper) | "linear" (official code)
    # top-down modulation of the token scorer: "post_norm" (ours: after its first LayerNorm) | "official" (before it,
    # as in the Salience DETR / SDCoNet code); docs/detector.md "Switches"
    modulation: str = "post_norm"
    # embedding added to the tokens the filtered encoder did not update: "per_level" (ours: one learned vector per
    # level, on tokens no level kept) | "row_col" (Salience DETR: learned row/column table, on tokens the last encoder
    # layer did not update)
    background: str = "per_level"
    sigma: float = 0.5
    # max(l, t, r, b) ranges in HR pixels per level, finest first
    level_ranges: tuple[tuple[float, float], ...] = ((-1.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, math.inf))


@dataclass
class DetectorConfig:
    """DINO deformable transformer with two-stage queries and contrastive denoising."""

    num_classes: int = 10
    d_model: int = 256
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    ffn_dim: int = 2048
    dropout: float = 0.0
    num_heads: int = 8
    num_points: int = 4
    num_queries: int = 300
    num_dn_queries: int = 100
    label_noise_ratio: float = 0.5
    box_noise_scale: float = 1.0
    num_detections: int = 100  # top-K returned by the inference forward
    pos_num_feats: int = 128
    pos_temperature: float = 20.0
    # multi-scale deformable attention core: "auto" (triton kernel on CUDA, else grid_sample), "gather", "grid_sample",
    # "triton"
    msda_impl: str = "auto"
    # what box head i refines the next layer's reference from: "raw" (DINO / Salience DETR: the decoder layer's raw
    # output; its LayerNorm-ed output feeds the prediction) | "normed" (the normed output for both; `tiny` keeps it
    # so the committed demo and ablation figures stay reproducible); docs/detector.md "Switches"
    reference_update: str = "raw"


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    neck: NeckConfig = field(default_factory=NeckConfig)
    sr_decoder: SRDecoderConfig = field(default_factory=SRDecoderConfig)
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    sr: bool = True  # build the SR decoder (ablation switch)
    # extension, not in the paper (1.0 = off): the encoder features feeding the SR decoder pass a GradScale,
    # identity forward, gradient x this factor backward, so L_sr reaches the shared encoder scaled (0 = not at all)
    # while the SR decoder itself still learns at rho * eta; sdconet/models/grad_scale.py
    sr_grad_scale: float = 1.0
    upscale: int = 2  # HR = upscale x LR


# --------------------------------------------------------------------------------------------------------------------
# Losses, data, training
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class LossConfig:
    class_weight: float = 1.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    matcher_class_cost: float = 2.0
    matcher_l1_cost: float = 5.0
    matcher_giou_cost: float = 2.0
    saliency_weight: float = 2.0
    sr_weight: float = 5.0
    # an unmatched query whose box has IoU >= this with an ignored target (e.g. DOTA difficult) gets no class loss;
    # a value > 1 turns that off (such queries are then trained as background)
    ignore_iou_threshold: float = 0.5
    # denoising slots that pad an image with fewer than max_gt targets: "ignore" (ours: no loss) | "background"
    # (DINO / mmdet: class loss towards background)
    dn_padding: str = "ignore"


@dataclass
class SyntheticDataConfig:
    """Procedural remote-sensing dataset generated on first use (``sdconet.data.synthetic``)."""

    num_images: int = 120
    val_fraction: float = 0.2
    image_size: int = 512  # HR side
    objects_per_image: tuple[int, int] = (4, 14)
    distractors_per_image: tuple[int, int] = (3, 10)  # unlabelled look-alikes (rooftops, ponds, wrecks)
    seed: int = 0


@dataclass
class DataConfig:
    """A COCO-format dataset (HR images + JSON); ``root: null`` means the embedded synthetic dataset."""

    root: Optional[str] = None
    train_json: str = "annotations/train.json"
    val_json: str = "annotations/val.json"
    train_images: str = "images/train"
    val_images: str = "images/val"
    cache_dir: str = ".cache/sdconet"
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    degradation: str = "bicubic"  # "bicubic" (paper) | "realistic"
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    random_crop: Optional[int] = None  # HR crop side, None = whole image
    min_box_area_fraction: float = 0.5  # random crop keeps a clipped box only if it keeps this much of its area
    ignore_difficult: bool = True
    strict: bool = False
    num_workers: int = 0
    seed: int = 0  # augmentation and realistic-degradation RNG (per item: seed, epoch, index)
    max_image_pixels: int = 2**29  # larger images are refused as decompression bombs (DOTA's largest is 20000^2)
    # "realistic" degradation ranges; each image draws its own value uniformly in [low, high]
    blur_sigma: tuple[float, float] = (0.2, 1.5)  # Gaussian blur at HR, in HR pixels
    noise_std: tuple[float, float] = (0.0, 0.03)  # additive Gaussian noise at LR, on [0, 1] intensities
    jpeg_quality: tuple[int, int] = (40, 95)


@dataclass
class TrainConfig:
    epochs: int = 52
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 1e-4
    backbone_lr_mult: float = 0.1
    sr_lr_ratio: float = 0.1  # rho: SR decoder lr = rho * detector lr in stage 2
    clip_max_norm: float = 0.1
    lr_drop_epochs: tuple[int, ...] = (27,)
    lr_gamma: float = 0.1
    schedule: str = "full"  # full | joint | det_only | sr_only | saliency_only
    stage1_epochs: int = 16
    grad_accum_steps: int = 1
    # None | "bf16" | "fp16" (GPU) | "auto": bf16 on a CPU with AMX-BF16, on CUDA bf16 where supported else fp16
    amp: Optional[str] = None
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    out_dir: str = "runs"
    eval_interval: int = 1
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    log_interval: int = 10


@dataclass
class Config:
    name: str = "paper"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------
def _coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Convert a YAML value to ``annotation`` (dataclass, tuple, Optional, scalar) or raise ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return _build(annotation, value, key, source)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{source}: '{key}' needs {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" (no dot) as a string; accept any float literal
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true/false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
        return value
    return value


def _build(cls: type, values: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{source}: unknown key(s) {', '.join(where + u for u in unknown)}; "
                          f"valid keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key, source)
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(name_or_path: str | Path, seen: tuple[str, ...] = ()) -> dict:
    """Read a preset or YAML file into a plain dict, resolving ``base`` chains."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            presets = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
            raise ConfigError(f"unknown config preset '{name_or_path}' (presets: {presets}; or pass a .yaml path)")
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if str(path.resolve()) in seen:
        raise ConfigError(f"{path}: circular 'base' chain")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    name = data.pop("name", path.stem)
    base = data.pop("base", None)
    if base is not None:
        base_ref = base if not str(base).endswith((".yaml", ".yml")) else str((path.parent / base))
        data = _merge(_read_yaml(base_ref, seen + (str(path.resolve()),)), data)
    data["name"] = name
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.epochs=3"`` -> (["train", "epochs"], 3)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': cannot parse value: {err}") from err
    return key.strip().split("."), value


def training_image_size(cfg: Config) -> int:
    """HR side of the images a run was trained on: the random crop, else the synthetic size, else 512."""
    if cfg.data.random_crop is not None:
        return cfg.data.random_crop
    if cfg.data.root is None:
        return cfg.data.synthetic.image_size
    return DEFAULT_TRAINING_TILE


def lr_image_size(cfg: Config) -> int:
    """LR side the network saw in training: ``training_image_size(cfg) // upscale``."""
    return training_image_size(cfg) // cfg.model.upscale


def load_config(name_or_path: str | Path = "paper", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a preset name (``paper``, ``tiny``) or YAML path, then apply dotted overrides."""
    data = _read_yaml(name_or_path)
    source = str(name_or_path)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{k}' is not a section")
        node[keys[-1]] = value
        source = f"{name_or_path} (with overrides)"
    return _build(Config, data, "", source)


def config_to_dict(cfg: Any) -> dict:
    """Plain, YAML/JSON-serialisable dict (tuples become lists, inf stays a float)."""

    def convert(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        return v

    return convert(cfg)


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    """Inverse of :func:`config_to_dict` (used when a checkpoint carries its config)."""
    return _build(Config, data, "", source)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
