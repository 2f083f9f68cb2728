"""Shared Swin encoder: timm ``features_only`` Swin at any input size, plus the patch-embedding tokens.

Two deviations from a stock timm Swin, both so that one set of weights behaves the same at every input size:

* ``always_partition=True``: every block keeps the configured window and shift, as in the original Swin detection
  backbone (timm would otherwise shrink windows to the feature size it was built for).
* :class:`PaddedShiftSwinBlock`: our block, holding timm's norm/attention/MLP modules (same state-dict keys), that
  pads the map to a window multiple *before* the cyclic shift, as the original Swin detection/segmentation code does.
  timm shifts first and pads afterwards, so when a map is not a window multiple (every stage at a 256-pixel input)
  its shift mask lets tokens from opposite image borders attend to each other (timm issue #2438). On window-multiple
  maps both orders give identical results.

timm is used through its public modules only (``create_model``, ``WindowAttention.forward(x, mask)``, the blocks'
``norm1/attn/drop_path1/norm2/mlp/drop_path2``); :data:`SUPPORTED_TIMM` is the range these were tested against
(``always_partition`` first appears in timm 1.0.8).

``model.encoder.out_norm`` adds one LayerNorm per stage output (mmdet's Swin, used by the official SDCoNet code);
off by default, which returns timm's raw stage outputs.
"""
from __future__ import annotations

import functools

import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file as load_safetensors
from packaging.version import InvalidVersion, Version
from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse

from sdconet.config import EncoderConfig
from sdconet.utils.constants import cached_tensor
from sdconet.utils.logging import get_logger

_LOG = get_logger(__name__)

NUM_STAGES = 4


class EncoderWeightsError(RuntimeError):
    """The encoder's pretrained file is missing or does not fit the configured encoder; the message names the file."""


# the timm releases this module was tested with: [min, max) (1.0.8 adds always_partition; 1.1 may change internals)
SUPPORTED_TIMM = ("1.0.8", "1.1")


class UnsupportedTimmError(RuntimeError):
    """The installed timm is outside :data:`SUPPORTED_TIMM`; the message names the supported range."""


def check_timm_version(version: str = timm.__version__) -> None:
    """Raise :class:`UnsupportedTimmError` unless ``SUPPORTED_TIMM[0] <= version < SUPPORTED_TIMM[1]``."""
    low, high = SUPPORTED_TIMM
    try:
        supported = Version(low) <= Version(version) < Version(high)
    except InvalidVersion:
        supported = False
    if not supported:
        raise UnsupportedTimmError(f"timm {version} is not supported by sdconet.models.encoder: the encoder was "
                                   f"tested with timm>={low},<{high} (pip install 'timm>={low},<{high}')")


class PaddedShiftSwinBlock(nn.Module):
    """A Swin block with the original pad-then-shift order of the windowed attention (see module docstring).

    Built from a timm ``SwinTransformerBlock``, whose ``norm1/attn/drop_path1/norm2/mlp/drop_path2`` modules it takes
    over (so the state-dict keys stay timm's); ``window_size``/``shift_size`` are the configured ones.
    ``[B, H, W, C] -> [B, H, W, C]``.
    """

    def __init__(self, block: SwinTransformerBlock, window_size: int, shift_size: int) -> None:
        super().__init__()
        self.norm1, self.attn, self.drop_path1 = block.norm1, block.attn, block.drop_path1
        self.norm2, self.mlp, self.drop_path2 = block.norm2, block.mlp, block.drop_path2
        self.window_size = (int(window_size), int(window_size))
        self.shift_size = (int(shift_size), int(shift_size))
        self.window_area = self.window_size[0] * self.window_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self._window_attention(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    def _window_attention(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, W, C] -> [B, H, W, C]."""
        _, height, width, channels = x.shape
        window_h, window_w = self.window_size
        shift_h, shift_w = self.shift_size
        x = F.pad(x, (0, 0, 0, (-width) % window_w, 0, (-height) % window_h))
        padded_h, padded_w = x.shape[1], x.shape[2]
        has_shift = shift_h > 0 or shift_w > 0
        attn_mask = None
        if has_shift:
            x = torch.roll(x, shifts=(-shift_h, -shift_w), dims=(1, 2))
            # built once per (size, dtype, device): no host->device copy per block and forward
            attn_mask = cached_tensor(("swin_shift_mask", int(padded_h), int(padded_w), tuple(self.window_size),
                                       tuple(self.shift_size)),
                                      lambda: shifted_window_mask(padded_h, padded_w, self.window_size,
                                                                  self.shift_size), x.dtype, x.device)
        windows = window_partition(x, self.window_size).view(-1, self.window_area, channels)
        windows = self.attn(windows, mask=attn_mask)
        x = window_reverse(windows.view(-1, window_h, window_w, channels), self.window_size, padded_h, padded_w)
        if has_shift:
            x = torch.roll(x, shifts=(shift_h, shift_w), dims=(1, 2))
        return x[:, :height, :width].contiguous()


@functools.lru_cache(maxsize=64)
def _shifted_window_mask_array(height: int, width: int, window: tuple[int, int], shift: tuple[int, int]) -> np.ndarray:
    regions = np.zeros((height, width), dtype=np.float32)
    label = 0
    for rows in (slice(0, -window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
        for cols in (slice(0, -window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
            regions[rows, cols] = label
            label += 1
    windows = regions.reshape(height // window[0], window[0], width // window[1], window[1])
    windows = windows.transpose(0, 2, 1, 3).reshape(-1, window[0] * window[1])  # [nW, window_area]
    different = windows[:, None, :] != windows[:, :, None]
    return np.where(different, -100.0, 0.0).astype(np.float32)


def shifted_window_mask(height: int, width: int, window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """Attention mask ``[nW, window_area, window_area]`` of shifted-window attention on a padded ``height x width``
    grid (0 within a region, -100 across regions).

    Built with numpy from Python ints, so an exported graph holds it as a constant: computing it with tensor
    slicing (timm's way) exports ScatterND nodes that ONNX Runtime rejects when a slice is empty (window == map size).
    """
    return torch.from_numpy(_shifted_window_mask_array(int(height), int(width), tuple(window), tuple(shift)))


def use_padded_shift_blocks(module: nn.Module, window_size: int) -> None:
    """Replace every timm ``SwinTransformerBlock`` inside ``module`` by a :class:`PaddedShiftSwinBlock` holding its
    modules: block ``i`` of a stage shifts by ``window_size // 2`` when ``i`` is odd (Swin's alternation)."""
    for stage in module.modules():
        blocks = getattr(stage, "blocks", None)
        if not isinstance(blocks, nn.Sequential):
            continue
        for index, block in enumerate(blocks):
            if isinstance(block, SwinTransformerBlock):
                blocks[index] = PaddedShiftSwinBlock(block, window_size, 0 if index % 2 == 0 else window_size // 2)


class EncoderOutput(NamedTuple):
    features: list[torch.Tensor]  # 4 x [B, C_i, H_i, W_i], strides 4/8/16/32
    patch_tokens: torch.Tensor  # [B, C_0, H/4, W/4] patch embedding (the SR decoder's long skip)


class SwinEncoder(nn.Module):
    """timm Swin (``features_only``) returning NCHW maps at strides 4/8/16/32 and the patch-embedding tokens.

    Input: ``[B, 3, h, w]`` normalised image, any size (padded bottom/right to a multiple of the patch size).
    Output: :class:`EncoderOutput` with ``features[i]`` of shape ``[B, channels[i], ceil(h / 2^(i+2)), ...]``.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        check_timm_version()
        if len(cfg.depths) != NUM_STAGES or len(cfg.num_heads) != NUM_STAGES:
            raise ValueError(f"model.encoder.depths and model.encoder.num_heads need {NUM_STAGES} entries, got "
                             f"{list(cfg.depths)} and {list(cfg.num_heads)}")
        try:
            self.swin = timm.create_model(
                cfg.name, pretrained=False, features_only=True, out_indices=tuple(range(NUM_STAGES)),
                embed_dim=cfg.embed_dim, depths=tuple(cfg.depths), num_heads=tuple(cfg.num_heads),
                window_size=cfg.window_size, drop_path_rate=cfg.drop_path_rate,
                strict_img_size=False, always_partition=True)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"model.encoder.name={cfg.name!r} is not a timm Swin Transformer (v1) model "
                             f"accepting the encoder settings: {err}") from err
        stage_names = [f"layers_{i}" for i in range(NUM_STAGES)]
        if list(self.swin.keys()) != ["patch_embed", *stage_names]:
            raise ValueError(f"model.encoder.name={cfg.name!r}: expected timm Swin modules patch_embed + "
                             f"{stage_names}, got {list(self.swin.keys())}")
        use_padded_shift_blocks(self.swin, cfg.window_size)
        self.patch_size = int(self.swin.patch_embed.patch_size[0])
        self.channels: list[int] = list(self.swin.feature_info.channels())
        self.strides: list[int] = list(self.swin.feature_info.reduction())
        self.patch_channels = cfg.embed_dim
        # per-stage output LayerNorm (mmdet Swin); None = timm's raw stage outputs. Built only when enabled, so the
        # default model's parameters (and their random init) are unchanged.
        self.out_norms = nn.ModuleList(nn.LayerNorm(c) for c in self.channels) if cfg.out_norm else None
        if cfg.pretrained_file:
            load_encoder_weights(self, cfg.pretrained_file)

    def forward(self, images: torch.Tensor) -> EncoderOutput:
        """images ``[B, 3, h, w]`` (normalised) -> :class:`EncoderOutput`."""
        height, width = images.shape[-2:]
        images = F.pad(images, (0, (-width) % self.patch_size, 0, (-height) % self.patch_size))
        tokens = self.swin.patch_embed(images)  # [B, h/4, w/4, C0] (NHWC)
        x = tokens
        features = []
        for index, stage in enumerate(list(self.swin.values())[1:]):
            x = stage(x)
            out = x if self.out_norms is None else self.out_norms[index](x)
            features.append(out.permute(0, 3, 1, 2).contiguous())
        return EncoderOutput(features, tokens.permute(0, 3, 1, 2).contiguous())


# ----------------------------------------------------------------------------------------------------------------
# Pretrained weights
# ----------------------------------------------------------------------------------------------------------------
def _to_feature_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ImageNet Swin checkpoint (timm or original Microsoft layout) or a saved encoder -> ``SwinEncoder.swin`` keys.

    Drops the classifier, the final norm and non-persistent buffers; the original layout keeps each stage's patch
    merging at the end of the stage (timm: at the start of the next one); timm's ``layers.N`` become ``layers_N``.
    """
    state_dict = {k.removeprefix("swin."): v for k, v in state_dict.items()}
    original_layout = "layers.0.downsample.reduction.weight" in state_dict
    out = {}
    for key, value in state_dict.items():
        if key.startswith(("head.", "norm.")) or key.endswith(("relative_position_index", "attn_mask")):
            continue
        if original_layout:
            key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", key)
        out[re.sub(r"^layers\.(\d+)\.", r"layers_\1.", key)] = value
    return out


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``torch.save`` checkpoint (its ``state_dict``/``model`` entry when it
    has one), without DDP/compile wrapper prefixes. Our own reader: timm's ``load_state_dict`` keywords vary across
    the supported 1.0.x releases."""
    if path.suffix == ".safetensors":
        checkpoint = load_safetensors(str(path), device="cpu")
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, dict):
        raise TypeError(f"expected a dict of tensors, got {type(checkpoint).__name__}")
    return {re.sub(r"^(_orig_mod\.|module\.)+", "", k): v for k, v in checkpoint.items()}


def load_encoder_weights(encoder: SwinEncoder, path: str | Path) -> None:
    """Load an ImageNet Swin checkpoint (``.pth``/``.safetensors``; timm or original layout) into ``encoder``.

    Raises :class:`EncoderWeightsError` naming the file when it is missing, unreadable or does not match the
    configured encoder (different widths, depths or window size).
    """
    path = Path(path)
    if not path.is_file():
        raise EncoderWeightsError(f"model.encoder.pretrained_file: {path} does not exist (no weights are downloaded; "
                                  "pass a local ImageNet Swin checkpoint or null for random init)")
    try:
        state_dict = _read_state_dict(path)
    except Exception as err:  # torch.load / safetensors raise several error types for unreadable files
        raise EncoderWeightsError(f"model.encoder.pretrained_file: cannot read {path}: {err}") from err
    state_dict = _to_feature_layout(state_dict)
    expected = encoder.swin.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state_dict.items()
                  if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or mismatched:
        details = "; ".join(f"{what} ({len(keys)}): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                            for what, keys in (("missing", missing), ("unexpected", unexpected),
                                               ("shape mismatch", mismatched)) if keys)
        raise EncoderWeightsError(f"model.encoder.pretrained_file: {path} does not fit the configured encoder "
                                  f"(check model.encoder.embed_dim/depths/num_heads/window_size): {details}")
    encoder.swin.load_state_dict(state_dict, strict=True)
    _LOG.info("loaded encoder weights from %s (%d tensors)", path, len(state_dict))
