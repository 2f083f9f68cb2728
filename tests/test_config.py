import math

import pytest
import torch

from sdconet.config import ConfigError, load_config, save_config


def test_presets_load_with_paper_numbers():
    paper = load_config("paper")
    assert paper.name == "paper"
    assert paper.model.saliency.level_ratio == (0.6, 0.8, 1.0, 1.0)
    assert paper.model.saliency.layer_ratio == (1.0, 0.8, 0.6, 0.6, 0.4, 0.2)
    assert paper.model.detector.num_queries == 300 and paper.model.detector.num_dn_queries == 100
    assert paper.model.saliency.level_ranges[-1] == (256.0, math.inf)
    tiny = load_config("tiny")
    assert tiny.name == "tiny"
    assert tiny.model.detector.d_model == 64
    assert len(tiny.model.saliency.layer_ratio) == tiny.model.detector.num_encoder_layers


def test_overrides_are_typed():
    cfg = load_config("tiny", ["train.epochs=3", "model.saliency.level_ratio=[0.5, 0.8, 1, 1]", "model.sr=false"])
    assert cfg.train.epochs == 3
    assert cfg.model.saliency.level_ratio == (0.5, 0.8, 1.0, 1.0)
    assert cfg.model.sr is False


@pytest.mark.parametrize("override, message", [
    ("model.detector.foo=1", "model.detector.foo"),
    ("train.epochs=abc", "train.epochs"),
    ("train.epochs", "section.key=value"),
    ("model.sr=3", "model.sr"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


def test_roundtrip_and_base_chain(tmp_path):
    cfg = load_config("tiny", ["train.epochs=2"])
    path = tmp_path / "saved.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    child = tmp_path / "child.yaml"
    child.write_text("base: tiny\ntrain:\n  batch_size: 4\n")
    loaded = load_config(child)
    assert loaded.train.batch_size == 4 and loaded.model.detector.d_model == 64 and loaded.name == "child"


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown config preset 'nope'"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_float_fields_accept_yaml11_exponent_strings():
    # YAML 1.1 parses "2e-4" (no dot) as a string; a float field takes it as the number it spells
    assert load_config("tiny", ["train.lr=2e-4"]).train.lr == 2e-4
    assert load_config("tiny", ["model.saliency.sigma=inf"]).model.saliency.sigma == math.inf


def test_amp_auto_resolution(tmp_path):
    from sdconet.engine.distributed import resolve_amp
    from sdconet.utils.cpu import has_amx_bf16 as cpu_has_amx_bf16
    amx = tmp_path / "cpuinfo_amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile amx_int8\n")
    plain = tmp_path / "cpuinfo_plain"
    plain.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")  # bf16 instructions, no AMX
    assert cpu_has_amx_bf16(amx) and not cpu_has_amx_bf16(plain) and not cpu_has_amx_bf16(tmp_path / "missing")
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu, amx) == "bf16"
    assert resolve_amp("auto", cpu, plain) is None
    for explicit in (None, "bf16", "fp16"):  # only "auto" is resolved
        assert resolve_amp(explicit, cpu, amx) == explicit
    assert load_config("tiny", ["train.amp=auto"]).train.amp == "auto"
