"""Encoder, neck, SR decoder, assembled SDCoNet, serial baseline, cost summary (tiny config; two full-size passes)."""
from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.swin_transformer import SwinTransformerBlock

from sdconet.config import load_config
from sdconet.losses.criterion import SetCriterion
from sdconet.models import SDCoNet, SerialBaseline, build_model
from sdconet.models.encoder import (SUPPORTED_TIMM, EncoderWeightsError, PaddedShiftSwinBlock, SwinEncoder,
                                    UnsupportedTimmError, check_timm_version)
from sdconet.models.grad_scale import GradScale
from sdconet.models.neck import ChannelMapperNeck
from sdconet.models.postprocess import select_topk_detections, valid_image_sizes
from sdconet.models.sr_decoder import SRDecoder
from sdconet.models.summary import main as summary_main


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # many tiny ops (conftest.py)


@pytest.fixture(scope="module")
def tiny():
    return load_config("tiny").model


def _targets(batch: int) -> list[dict]:
    return [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.1], [0.7, 0.6, 0.1, 0.2]])}
            for _ in range(batch)]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------------------------
def _input_dependencies(block: SwinTransformerBlock, size: int, at: tuple[int, int]) -> torch.Tensor:
    """[size, size] bool: which input tokens the output token ``at`` depends on."""
    x = torch.randn(1, size, size, block.norm1.normalized_shape[0], requires_grad=True)
    block(x)[0, at[0], at[1]].sum().backward()
    return x.grad[0].abs().sum(-1) > 0


def test_padded_shift_block_keeps_image_borders_apart():
    block = SwinTransformerBlock(16, (8, 8), num_heads=2, window_size=7, shift_size=3, always_partition=True,
                                 dynamic_mask=True).eval()
    # timm shifts before padding: on an 8x8 map the top-left token sees the bottom rows through the wrap-around
    assert _input_dependencies(block, 8, (0, 0))[3:].any()
    ours = PaddedShiftSwinBlock(block, window_size=7, shift_size=3)
    assert set(ours.state_dict()) <= set(block.state_dict())  # timm's keys: timm checkpoints load unchanged
    # original Swin order: the wrapped-around 3x3 corner is its own masked region
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:3, :3] = True
    assert torch.equal(_input_dependencies(ours, 8, (0, 0)), expected)
    # on window-multiple maps both orders are the same computation
    x = torch.randn(2, 14, 14, 16)
    with torch.no_grad():
        assert torch.allclose(ours(x), block(x), atol=1e-6)


def test_unsupported_timm_names_the_supported_range():
    check_timm_version(timm.__version__)  # the installed one is in range (pyproject pins it)
    low, high = SUPPORTED_TIMM
    for version in ("1.0.7", high, "0.9.16", "not-a-version"):
        with pytest.raises(UnsupportedTimmError, match=re.escape(f"timm>={low},<{high}")):
            check_timm_version(version)
    check_timm_version(low)


@pytest.mark.parametrize("size", [(256, 256), (128, 128), (192, 256), (98, 130)])
def test_encoder_any_input_size(tiny, size):
    encoder = SwinEncoder(tiny.encoder).eval()
    assert not any(isinstance(m, SwinTransformerBlock) for m in encoder.modules())
    assert sum(isinstance(m, PaddedShiftSwinBlock) for m in encoder.modules()) == sum(tiny.encoder.depths)
    with torch.no_grad():
        out = encoder(torch.randn(2, 3, *size))
    width = tiny.encoder.embed_dim
    assert encoder.strides == [4, 8, 16, 32]
    for index, (feature, stride) in enumerate(zip(out.features, encoder.strides)):
        assert feature.shape == (2, width * 2 ** index, _ceil_div(size[0], stride), _ceil_div(size[1], stride))
        assert torch.isfinite(feature).all()
    assert out.patch_tokens.shape == (2, width, _ceil_div(size[0], 4), _ceil_div(size[1], 4))


def _timm_swin(cfg) -> torch.nn.Module:
    """A randomly initialised classification Swin in timm's ImageNet checkpoint layout (with head and final norm)."""
    return timm.create_model(cfg.name, pretrained=False, embed_dim=cfg.embed_dim, depths=cfg.depths,
                             num_heads=cfg.num_heads, window_size=cfg.window_size)


def _to_original_layout(state_dict: dict) -> dict:
    """timm Swin keys -> original Microsoft layout (patch merging at the end of the previous stage)."""
    renamed = {}
    for key, value in state_dict.items():
        key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        renamed[key.replace("head.fc.", "head.")] = value
    return renamed


def _assert_same_weights(encoder: SwinEncoder, reference: dict) -> None:
    loaded = encoder.swin.state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_encoder_loads_imagenet_layouts_and_its_own_weights(tiny, tmp_path):
    torch.manual_seed(1)
    classifier = _timm_swin(tiny.encoder)
    timm_file = tmp_path / "swin_timm.pth"
    torch.save(classifier.state_dict(), timm_file)
    original_file = tmp_path / "swin_original.pth"
    torch.save({"model": _to_original_layout(classifier.state_dict())}, original_file)

    reference = SwinEncoder(dataclasses.replace(tiny.encoder, pretrained_file=str(timm_file)))
    assert torch.equal(reference.swin.patch_embed.proj.weight, classifier.patch_embed.proj.weight)
    assert torch.equal(reference.swin.layers_2.downsample.reduction.weight,
                       classifier.layers[2].downsample.reduction.weight)
    _assert_same_weights(SwinEncoder(dataclasses.replace(tiny.encoder, pretrained_file=str(original_file))),
                         reference.swin.state_dict())

    own_file = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in reference.swin.state_dict().items()}, str(own_file))
    _assert_same_weights(SwinEncoder(dataclasses.replace(tiny.encoder, pretrained_file=str(own_file))),
                         reference.swin.state_dict())


def test_encoder_weight_errors_name_the_file(tiny, tmp_path):
    missing = tmp_path / "nowhere" / "swin_tiny.pth"
    with pytest.raises(EncoderWeightsError, match=re.escape(str(missing))):
        SwinEncoder(dataclasses.replace(tiny.encoder, pretrained_file=str(missing)))

    wider = tmp_path / "wider.pth"
    torch.save(_timm_swin(dataclasses.replace(tiny.encoder, embed_dim=48)).state_dict(), wider)
    with pytest.raises(EncoderWeightsError, match=re.escape(str(wider)) + ".*shape mismatch"):
        SwinEncoder(dataclasses.replace(tiny.encoder, pretrained_file=str(wider)))

    unrelated = tmp_path / "unrelated.pth"
    torch.save({"conv.weight": torch.zeros(3)}, unrelated)
    with pytest.raises(EncoderWeightsError, match=re.escape(str(unrelated)) + ".*missing"):
        SwinEncoder(dataclasses.replace(tiny.encoder, pretrained_file=str(unrelated)))

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderWeightsError, match="cannot read " + re.escape(str(garbage))):
        SwinEncoder(dataclasses.replace(tiny.encoder, pretrained_file=str(garbage)))


# ----------------------------------------------------------------------------------------------------------------
# Neck, SR decoder, post-processing
# ----------------------------------------------------------------------------------------------------------------
def test_neck_levels_and_masks(tiny):
    channels = [tiny.encoder.embed_dim * 2 ** i for i in range(4)]
    neck = ChannelMapperNeck(channels[1:], tiny.neck)
    h, w = 64, 128  # LR size; encoder maps at strides 8/16/32
    features = [torch.randn(2, c, h // s, w // s) for c, s in zip(channels[1:], (8, 16, 32))]
    mask = torch.zeros(2, h, w, dtype=torch.bool)
    mask[1, :, 64:] = True  # second image: right half is padding
    levels, masks = neck(features, mask)
    assert [tuple(level.shape) for level in levels] == [(2, tiny.neck.channels, h // s, w // s) for s in (8, 16, 32, 64)]
    for level_mask, s in zip(masks, (8, 16, 32, 64)):
        assert level_mask.shape == (2, h // s, w // s)
        assert not level_mask[0].any()
        assert level_mask[1, :, (64 // s):].all() and not level_mask[1, :, :(64 // s)].any()
    assert neck(features, None)[1] is None


def test_sr_decoder_odd_sizes(tiny):
    encoder = SwinEncoder(tiny.encoder).eval()
    decoder = SRDecoder(encoder.channels, encoder.patch_channels, encoder.patch_size, tiny.sr_decoder, 3)
    with torch.no_grad():
        encoded = encoder(torch.randn(1, 3, 98, 130))
        out = decoder(encoded.features, encoded.patch_tokens, (98, 130))
    assert out.shape == (1, 3, 294, 390) and torch.isfinite(out).all()


def test_postprocess_topk_over_queries_and_classes():
    logits = torch.full((2, 3, 4), -10.0)
    logits[0, 2, 1] = 3.0  # best: query 2, class 1
    logits[0, 0, 3] = 1.0  # second: query 0, class 3
    logits[1, 1, 0] = 2.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.25, 0.5, 0.5, 1.0]]]).repeat(2, 1, 1)
    masks = torch.zeros(2, 40, 60, dtype=torch.bool)
    masks[1, 20:] = True
    masks[1, :, 30:] = True
    sizes = valid_image_sizes(masks)
    assert sizes.tolist() == [[40.0, 60.0], [20.0, 30.0]]
    out = select_topk_detections(logits, boxes, sizes, num_detections=2)
    assert out["labels"].dtype == torch.int64 and out["labels"][0].tolist() == [1, 3]
    assert torch.allclose(out["scores"][0], torch.tensor([3.0, 1.0]).sigmoid())
    # image 0 (60 wide, 40 high): query 2 = cxcywh (0.25, 0.5, 0.5, 1.0) -> x 0..30, y 0..40
    assert torch.allclose(out["boxes"][0, 0], torch.tensor([0.0, 0.0, 30.0, 40.0]))
    assert torch.allclose(out["boxes"][0, 1], torch.tensor([24.0, 12.0, 36.0, 28.0]))
    # image 1 is scaled by its unpadded 30 x 20 size: query 1 = (0.1, 0.1, 0.1, 0.1)
    assert out["labels"][1, 0] == 0 and torch.allclose(out["boxes"][1, 0], torch.tensor([1.5, 1.0, 4.5, 3.0]))


# ----------------------------------------------------------------------------------------------------------------
# Assembled model (tiny)
# ----------------------------------------------------------------------------------------------------------------
def test_padded_batch_of_two_sizes(tiny):
    model = build_model(tiny)
    images = torch.zeros(2, 3, 64, 96)
    images[0] = torch.rand(3, 64, 96)
    images[1, :, :48, :64] = torch.rand(3, 48, 64)
    masks = torch.ones(2, 64, 96, dtype=torch.bool)
    masks[0] = False
    masks[1, :48, :64] = False
    out = model(images, masks, targets=_targets(2))
    assert out["sr_image"].shape == (2, 3, 128, 192)
    assert out["valid_ratios"][0].eq(1).all()
    assert torch.allclose(out["valid_ratios"][1, 0], torch.tensor([64 / 96, 48 / 64]))
    assert out["level_masks"][0][1].sum() == 8 * 12 - 6 * 8 and not out["level_masks"][0][0].any()
    model.eval()
    with torch.no_grad():
        detections = model.infer(images, masks)
    assert detections["boxes"].shape == (2, tiny.detector.num_detections, 4)
    assert all(torch.isfinite(v.float()).all() for v in detections.values())


def test_non_square_input_shapes(tiny):
    model = build_model(tiny)
    out = model(torch.rand(1, 3, 64, 96), targets=_targets(1))
    assert out["pred_logits"].shape == (1, tiny.detector.num_queries, tiny.detector.num_classes)
    assert out["spatial_shapes"].tolist() == [[8, 12], [4, 6], [2, 3], [1, 2]]
    assert out["sr_image"].shape == (1, 3, 128, 192)
    assert len(out["saliency_logits"]) == 4 and out["saliency_logits"][0].shape == (1, 96)
    model.eval()
    with torch.no_grad():
        detections = model.infer(torch.rand(1, 3, 64, 96))
    assert detections["saliency"].shape == (1, 1, 8, 12)
    assert detections["labels"].dtype == torch.int64


def _grad_norm(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_backward_reaches_every_branch(tiny):
    model = build_model(tiny)
    out = model(torch.rand(2, 3, 64, 64), targets=_targets(2))
    loss = (out["pred_logits"].sigmoid().mean() + out["pred_boxes"].mean() + out["sr_image"].abs().mean()
            + sum(s.sigmoid().mean() for s in out["saliency_logits"]))
    loss.backward()
    saliency = model.detector.saliency
    rest_of_detector = [p for n, p in model.detector.named_parameters() if not n.startswith("saliency.")]
    for name, module in (("encoder", model.encoder), ("neck", model.neck), ("saliency", saliency),
                         ("sr_decoder", model.sr_decoder)):
        assert _grad_norm(module) > 0, f"no gradient reached the {name}"
    assert sum(float(p.grad.abs().sum()) for p in rest_of_detector if p.grad is not None) > 0

    # the SR loss alone trains the shared encoder but not the detection branch
    model.zero_grad(set_to_none=True)
    model(torch.rand(1, 3, 64, 64))["sr_image"].abs().mean().backward()
    assert _grad_norm(model.encoder) > 0 and _grad_norm(model.sr_decoder) > 0
    assert _grad_norm(model.neck) == 0 and _grad_norm(model.detector) == 0


def test_sr_switch_and_run_sr_false(tiny):
    without_sr = build_model(dataclasses.replace(tiny, sr=False))
    assert without_sr.sr_decoder is None
    assert "sr_image" not in without_sr(torch.rand(1, 3, 64, 64))

    model = build_model(tiny)
    calls = []
    model.sr_decoder.register_forward_hook(lambda *args: calls.append(1))
    out = model(torch.rand(1, 3, 64, 64), run_sr=False)
    assert calls == [] and "sr_image" not in out
    model(torch.rand(1, 3, 64, 64), run_sr=True)
    assert calls == [1]


def test_trace_inference_matches_eager(tiny):
    model = build_model(tiny).eval()
    example, other = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape-derived Python ints are constant by design
        traced = torch.jit.trace_module(model, {"infer": (example,)}, strict=False, check_trace=False)
    with torch.no_grad():
        for images in (example, other):  # a new input checks nothing data-dependent was frozen into the trace
            eager, graph = model.infer(images), traced.infer(images)
            assert eager.keys() == graph.keys()
            for key in eager:
                assert torch.allclose(eager[key].float(), graph[key].float(), atol=1e-5), key


def test_serial_baseline_runs_sr_then_detects_at_hr(tiny):
    serial = SerialBaseline(tiny)
    assert serial.detection_network.sr_decoder is None
    out = serial(torch.rand(1, 3, 64, 64), targets=_targets(1))
    assert out["sr_image"].shape == (1, 3, 128, 128)
    assert out["spatial_shapes"].tolist() == [[16, 16], [8, 8], [4, 4], [2, 2]]  # HR-size detector
    serial.eval()
    with torch.no_grad():
        detections = serial.infer(torch.rand(1, 3, 64, 64))
    assert detections["boxes"].shape == (1, tiny.detector.num_detections, 4)
    assert detections["saliency"].shape == (1, 1, 16, 16)


def test_summary_cli_json(tmp_path, tiny):
    path = tmp_path / "summary.json"
    summary_main(["--config", "tiny", "--imgsz", "64", "--json", str(path)])
    cost = json.loads(path.read_text())
    params, gmacs = cost["params_m"], cost["gmacs"]
    assert {"encoder", "neck", "detector", "saliency", "sr_decoder", "total_inference"} <= params.keys()
    assert {"inference", "serial_baseline", "no_saliency", "no_sr", "detection_only"} <= gmacs.keys()
    assert params["total_inference"] == pytest.approx(params["encoder"] + params["neck"] + params["detector"])
    model = SDCoNet(tiny)
    assert params["sr_decoder"] == pytest.approx(sum(p.numel() for p in model.sr_decoder.parameters()) / 1e6)
    assert gmacs["no_sr"] == pytest.approx(gmacs["inference"])  # the SR decoder is not in the inference graph
    assert gmacs["training_forward"] > gmacs["inference"] and gmacs["serial_baseline"] > gmacs["inference"]
    assert sum(v for k, v in cost["gmacs_breakdown"]["inference"].items() if k != "saliency") == pytest.approx(
        gmacs["inference"])
    assert cost["gmacs_breakdown"]["inference"]["sr_decoder"] == 0
    assert cost["encoder_tokens_per_layer"] == model.detector.encoder_token_counts([[8, 8], [4, 4], [2, 2], [1, 1]])
    assert cost["paper_gflops"] == {"inference": 16.94, "serial_baseline": 88.22}


# ----------------------------------------------------------------------------------------------------------------
# Full size (paper config, 256 x 256 LR): one training forward with SR and one inference pass
# ----------------------------------------------------------------------------------------------------------------
def test_paper_model_at_256():
    cfg = load_config("paper").model
    model = build_model(cfg)
    assert model.detector.encoder_token_counts([[32, 32], [16, 16], [8, 8], [4, 4]]) == [898, 718, 538, 538, 359,
                                                                                          179]
    images = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        out = model(images, targets=_targets(1))
    assert out["sr_image"].shape == (1, 3, 512, 512) and torch.isfinite(out["sr_image"]).all()
    assert out["spatial_shapes"].tolist() == [[32, 32], [16, 16], [8, 8], [4, 4]]  # 1360 neck tokens
    assert out["encoder_tokens_per_layer"] == [898, 718, 538, 538, 359, 179]
    assert out["pred_logits"].shape == (1, 300, cfg.detector.num_classes) and torch.isfinite(out["pred_logits"]).all()

    model.eval()
    with torch.no_grad():
        detections = model.infer(images)
    k = cfg.detector.num_detections
    assert detections["boxes"].shape == (1, k, 4) and detections["scores"].shape == (1, k)
    assert detections["labels"].shape == (1, k) and detections["labels"].dtype == torch.int64
    assert detections["saliency"].shape == (1, 1, 32, 32)
    assert all(torch.isfinite(v.float()).all() for v in detections.values())
    assert ((detections["saliency"] >= 0) & (detections["saliency"] <= 1)).all()


# ----------------------------------------------------------------------------------------------------------------
# Fidelity switches (docs/detector.md "Switches"): at our defaults the model computes exactly what it did before the
# switches existed; flipped, each changes only the computation it names
# ----------------------------------------------------------------------------------------------------------------
REFERENCE = Path(__file__).parent / "data" / "tiny_reference_outputs.json"


def _reference_targets() -> list[dict]:
    # image 1 has fewer boxes than image 0: its denoising groups carry padding slots
    return [{"labels": torch.tensor([1, 3, 2]), "size": torch.tensor([128, 128]),
             "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.1], [0.7, 0.6, 0.1, 0.2], [0.5, 0.5, 0.3, 0.3]])},
            {"labels": torch.tensor([0]), "size": torch.tensor([128, 128]),
             "boxes": torch.tensor([[0.25, 0.3, 0.2, 0.2]])}]


def _reference_run(*overrides: str, state_dict: dict | None = None) -> tuple[dict, torch.nn.Module]:
    """The seeded tiny run recorded in tests/data/tiny_reference_outputs.json (the procedure must not change)."""
    torch.manual_seed(0)
    cfg = load_config("tiny", list(overrides))
    model = build_model(cfg.model)
    if state_dict is not None:  # same weights as another model, new parameters of a switch stay as initialised
        model.load_state_dict(state_dict, strict=False)
    criterion = SetCriterion.from_config(cfg)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 64, 64, generator=g)
    images_hr = torch.rand(2, 3, 128, 128, generator=g)
    targets = _reference_targets()
    model.train()
    torch.manual_seed(2)  # denoising noise
    out = model(images, None, targets)
    losses = criterion(out, targets, images_hr)
    model.eval()
    with torch.no_grad():
        inferred = model.infer(images)
    record = {"losses": {k: float(v.detach()) for k, v in losses.items()}, "sr_sum": float(out["sr_image"].sum()),
              "pred_logits": out["pred_logits"].detach(), "pred_boxes": out["pred_boxes"].detach(),
              "infer_boxes": inferred["boxes"], "infer_scores": inferred["scores"], "saliency": inferred["saliency"],
              "saliency_logits": [x.detach() for x in out["saliency_logits"]]}
    return record, model


def _assert_matches_reference(record: dict) -> None:
    reference = json.loads(REFERENCE.read_text())
    assert record["losses"].keys() == reference["losses"].keys()
    for key, value in reference["losses"].items():
        assert record["losses"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert record["sr_sum"] == pytest.approx(reference["sr_sum"], rel=1e-4)
    for key in ("pred_logits", "pred_boxes", "infer_boxes", "infer_scores", "saliency"):
        assert torch.allclose(record[key].flatten(), torch.tensor(reference[key]), atol=1e-4), key


def test_defaults_reproduce_the_outputs_recorded_before_the_switches():
    """The snapshot was made by the code of bf1121a, before any switch existed (tests/data/make_tiny_reference.py);
    tiny's value of each switch added since must reproduce it."""
    assert json.loads(REFERENCE.read_text())["recorded_at"].startswith("bf1121a ")
    defaults = ("model.saliency.modulation=post_norm", "model.saliency.background=per_level",
                "loss.dn_padding=ignore", "model.encoder.out_norm=false", "model.detector.reference_update=normed",
                "model.sr_grad_scale=1.0")
    _assert_matches_reference(_reference_run(*defaults)[0])


def test_switch_modulation_official_changes_only_the_modulated_levels():
    base, model = _reference_run()
    flipped, _ = _reference_run("model.saliency.modulation=official", state_dict=model.state_dict())
    # the coarsest level has no coarser level above it: unmodulated, identical
    assert torch.equal(base["saliency_logits"][-1], flipped["saliency_logits"][-1])
    for level in range(3):
        assert not torch.allclose(base["saliency_logits"][level], flipped["saliency_logits"][level], atol=1e-4)
    assert base["sr_sum"] == flipped["sr_sum"]  # the SR branch does not see the saliency


def test_switch_background_row_col_changes_only_the_encoder_background():
    base, model = _reference_run()
    flipped, flipped_model = _reference_run("model.saliency.background=row_col", state_dict=model.state_dict())
    encoder = flipped_model.detector.encoder
    assert not hasattr(encoder, "background_embed") and encoder.background_rows.shape == (200, 32)
    for a, b in zip(base["saliency_logits"], flipped["saliency_logits"]):  # upstream of the encoder: unchanged
        assert torch.equal(a, b)
    assert base["sr_sum"] == flipped["sr_sum"]
    assert not torch.allclose(base["pred_logits"], flipped["pred_logits"], atol=1e-4)


def test_background_row_col_is_added_where_salience_detr_adds_it():
    from sdconet.models.deformable_encoder import SaliencyFilteredEncoder
    encoder = SaliencyFilteredEncoder(2, 16, 32, 0.0, 2, 2, 2, "gather", (1.0, 0.5), 4, background="row_col")
    shapes = [(4, 4), (2, 2)]
    table = encoder._background_table(shapes)  # [20, 16]
    # token (y=1, x=2) of level 0: column 2 then row 1; level 1 restarts at (0, 0)
    assert torch.equal(table[1 * 4 + 2], torch.cat((encoder.background_cols[2], encoder.background_rows[1])))
    assert torch.equal(table[16], torch.cat((encoder.background_cols[0], encoder.background_rows[0])))
    g = torch.Generator().manual_seed(0)
    features = torch.randn(1, 20, 16, generator=g)
    logits = [torch.randn(1, 16, generator=g), torch.randn(1, 4, generator=g)]
    padding = torch.zeros(1, 20, dtype=torch.bool)
    valid_ratios = torch.ones(1, 2, 2)
    level_start = torch.tensor([0, 16])
    with torch.no_grad():
        memory, counts = encoder(features, torch.zeros_like(features), shapes, level_start, valid_ratios, padding,
                                 logits, [16, 4], lambda x: x[..., :3])
        encoder.background_rows.zero_()
        encoder.background_cols.zero_()
        plain, _ = encoder(features, torch.zeros_like(features), shapes, level_start, valid_ratios, padding,
                           logits, [16, 4], lambda x: x[..., :3])
    changed = (memory - plain).abs().sum(-1)[0] > 0
    # the last layer updated counts[-1] tokens; every other (valid) token got the table entry
    assert counts == [20, 10] and int(changed.sum()) == 20 - counts[-1]


def test_switch_dn_padding_background_changes_only_the_denoising_class_loss():
    base, model = _reference_run()
    flipped, _ = _reference_run("loss.dn_padding=background", state_dict=model.state_dict())
    changed = {k for k in base["losses"] if base["losses"][k] != flipped["losses"][k]}
    assert changed == {"loss_class_dn", "loss_class_dn_aux0", "loss"}
    for key in ("loss_class_dn", "loss_class_dn_aux0"):  # more background terms in the same normaliser
        assert flipped["losses"][key] > base["losses"][key]


def test_dn_padding_weights():
    meta = {"num_groups": 2, "single_pad": 6, "pad_size": 12}  # max_gt = 3
    targets = [{"labels": torch.tensor([1])}]
    _, ignore = SetCriterion._dn_indices(targets, meta, 12, torch.device("cpu"), "ignore")
    _, background = SetCriterion._dn_indices(targets, meta, 12, torch.device("cpu"), "background")
    # group layout: 3 positive slots then 3 negative slots; target 0 is slot 0 / 3
    assert ignore[0].tolist() == [1, 0, 0, 1, 0, 0] * 2
    assert background[0].tolist() == [1.0] * 12
    with pytest.raises(ValueError, match="loss.dn_padding"):
        SetCriterion._dn_indices(targets, meta, 12, torch.device("cpu"), "zero")


def test_switch_encoder_out_norm_adds_only_stage_norms(tiny):
    base = SwinEncoder(tiny.encoder).eval()
    normed = SwinEncoder(dataclasses.replace(tiny.encoder, out_norm=True)).eval()
    missing = normed.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert sorted(missing) == sorted(f"out_norms.{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        raw, out = base(x), normed(x)
    assert torch.equal(raw.patch_tokens, out.patch_tokens)
    for stage, (a, b) in enumerate(zip(raw.features, out.features)):
        expected = torch.nn.functional.layer_norm(a.permute(0, 2, 3, 1), a.shape[1:2]).permute(0, 3, 1, 2)
        assert torch.allclose(b, expected, atol=1e-5), stage


# ----------------------------------------------------------------------------------------------------------------
# The `official` preset
# ----------------------------------------------------------------------------------------------------------------
OFFICIAL_AT_TINY_WIDTHS = [  # tiny widths/depths; every official choice (switches, SR layout, window 8) kept
    "model.encoder.embed_dim=32", "model.encoder.depths=[1,1,2,1]", "model.encoder.num_heads=[1,2,4,8]",
    "model.neck.channels=64", "model.neck.num_groups=8",
    "model.sr_decoder.stage_widths=[32,16,8,4]", "model.sr_decoder.depths=[1,2,1,1]",
    "model.sr_decoder.num_heads=[2,2,2,1]",
    "model.saliency.layer_ratio=[1.0,0.6]", "model.saliency.foreground_topk=20", "model.saliency.hidden_dim=64",
    "model.detector.num_classes=6", "model.detector.d_model=64", "model.detector.num_encoder_layers=2",
    "model.detector.num_decoder_layers=2", "model.detector.ffn_dim=128", "model.detector.num_heads=4",
    "model.detector.num_points=2", "model.detector.num_queries=50", "model.detector.num_dn_queries=20",
    "model.detector.num_detections=50", "model.detector.pos_num_feats=32"]


def test_official_preset_choices_and_tiny_forward_backward():
    cfg = load_config("official", OFFICIAL_AT_TINY_WIDTHS)
    assert (cfg.model.saliency.modulation, cfg.model.saliency.background, cfg.loss.dn_padding,
            cfg.model.saliency.target_mode) == ("official", "row_col", "background", "linear")
    assert cfg.model.encoder.out_norm and cfg.model.sr_decoder.window_size == 8
    assert (cfg.data.hflip, cfg.data.vflip, cfg.data.rot90) == (True, False, False)
    model = build_model(cfg.model).train()
    assert model.sr_decoder.long_skip_in is not None and model.encoder.out_norms is not None
    targets = _reference_targets()
    targets[0]["labels"] = torch.tensor([1, 3, 5])
    out = model(torch.rand(2, 3, 64, 64), None, targets)
    losses = SetCriterion.from_config(cfg)(out, targets, torch.rand(2, 3, 128, 128))
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and losses["loss_sr"] > 0
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_official_summary_sr_decoder_size(tmp_path):
    from sdconet.models.summary import model_cost
    cost = model_cost(load_config("official").model, (128, 128), ablations=False, serial_baseline=False)
    assert cost["params_m"]["sr_decoder"] == pytest.approx(22.06, abs=0.005)  # official SRNet, our layout (measured)
    paper = model_cost(load_config("paper").model, (128, 128), ablations=False, serial_baseline=False)
    assert paper["params_m"]["sr_decoder"] < 5.0  # ours stays the light decoder


def _sr_loss_grads(scale: float, state_dict: dict | None) -> tuple[dict, dict, torch.nn.Module]:
    """Gradients of L_sr alone on the encoder and the SR decoder of a tiny model with ``model.sr_grad_scale``."""
    torch.manual_seed(0)
    model = build_model(load_config("tiny", [f"model.sr_grad_scale={scale}"]).model).train()
    if state_dict is not None:
        model.load_state_dict(state_dict)
    g = torch.Generator().manual_seed(3)
    images, images_hr = torch.rand(1, 3, 64, 64, generator=g), torch.rand(1, 3, 128, 128, generator=g)
    out = model(images, None, _reference_targets()[:1])
    from sdconet.utils.image import normalize
    torch.nn.functional.l1_loss(out["sr_image"], normalize(images_hr)).backward()
    grads = {part: {n: p.grad.clone() for n, p in getattr(model, part).named_parameters() if p.grad is not None}
             for part in ("encoder", "sr_decoder")}
    return grads["encoder"], grads["sr_decoder"], model


@pytest.mark.parametrize("scale", [0.25, 0.0])
def test_sr_grad_scale_scales_the_sr_gradient_into_the_encoder_only(scale):
    assert load_config("paper").model.sr_grad_scale == 1.0 and load_config("official").model.sr_grad_scale == 1.0
    encoder_1, sr_1, model = _sr_loss_grads(1.0, None)
    assert isinstance(model.sr_grad_scale, GradScale) and len(encoder_1) > 0
    encoder_s, sr_s, _ = _sr_loss_grads(scale, model.state_dict())
    assert encoder_s.keys() == encoder_1.keys()
    for name, grad in encoder_1.items():  # dL_sr/d(encoder weights) scales with the factor ...
        assert torch.allclose(encoder_s[name], scale * grad, rtol=1e-5, atol=1e-9), name
    assert any(float(g.abs().max()) > 0 for g in encoder_1.values())
    for name, grad in sr_1.items():  # ... while the SR decoder's own gradient (and the forward) is unchanged
        assert torch.equal(sr_s[name], grad), name


def test_sr_grad_scale_refuses_a_negative_factor():
    with pytest.raises(ValueError, match="model.sr_grad_scale must be >= 0"):
        build_model(load_config("tiny", ["model.sr_grad_scale=-0.5"]).model)
