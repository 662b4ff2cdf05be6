"""bf16 where it is fast, its float32 emulation where it is not, fp32 when a run was trained so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ris_core import precision
from ris_core.encoders import MobileNetTokenEncoder, MobileNetTokenEncoderConfig
from tests.conftest import REPO, tiny_train_args


@pytest.fixture
def bf16_mode(monkeypatch):
    def set_mode(mode: str) -> None:
        monkeypatch.setenv(precision.OVERRIDE, mode)
        precision.fast_bf16.cache_clear()

    yield set_mode
    monkeypatch.delenv(precision.OVERRIDE, raising=False)
    precision.fast_bf16.cache_clear()


def test_the_override_decides_and_rounding_keeps_bf16_values(bf16_mode):
    bf16_mode("native")
    assert precision.fast_bf16() is True
    bf16_mode("emulated")
    assert precision.fast_bf16() is False
    x = torch.tensor([1.0, 1.0 + 2**-9, 3.14159])
    assert torch.equal(precision.round_to_bf16(x), x.bfloat16().float())
    assert precision.round_to_bf16(x)[1] == 1.0  # below bf16's 8-bit mantissa


def _encoder(backbone_precision: str = "bf16") -> MobileNetTokenEncoder:
    encoder = MobileNetTokenEncoder(MobileNetTokenEncoderConfig(hidden_size=32, backbone_precision=backbone_precision))
    encoder.load_imagenet_backbone()
    encoder.freeze_backbone()
    return encoder


def test_emulated_bf16_backbone_is_autocast_up_to_accumulation_order(bf16_mode):
    from ris_core.images import open_image, square
    from ris_core.modeling import ModelSpec
    from training.data import normalize

    photos = sorted(Path(REPO / "data/demo/images").glob("*.jpg"))[:8]  # real photos: noise is not the test
    pixels = normalize(torch.stack([torch.from_numpy(np.array(square(open_image(p), 128, 80))).permute(2, 0, 1)
                                    for p in photos]), ModelSpec())
    encoder = _encoder()
    bf16_mode("native")
    autocast = encoder.backbone_maps(pixels)
    bf16_mode("emulated")
    emulated = encoder.backbone_maps(pixels)
    fp32 = _encoder("fp32").backbone_maps(pixels)
    for a, e, f in zip(autocast, emulated, fp32):
        close = torch.nn.functional.cosine_similarity(a.flatten(1), e.flatten(1))
        far = torch.nn.functional.cosine_similarity(a.flatten(1), f.flatten(1))
        assert close.min() > 0.999 and (a - e).abs().mean() < (a - f).abs().mean() / 4
        assert far.min() < close.min()
    # fp32 maps are the plain float32 network, not a rounded one
    plain = encoder.backbone(pixels)
    assert all(torch.allclose(f, p, atol=1e-4) for f, p in zip(fp32, plain))


def _rounded_after_every_op(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The emulation as first written: float32 tensors rounded to bf16 values after every op."""
    from ris_core.encoders import _InvertedResidual

    round_ = precision.round_to_bf16
    if isinstance(module, torch.nn.Conv2d):
        return round_(torch.nn.functional.conv2d(x, round_(module.weight), None, module.stride, module.padding,
                                                 module.dilation, module.groups))
    if isinstance(module, torch.nn.BatchNorm2d):
        return round_(module(x))
    if isinstance(module, torch.nn.ReLU6):
        return torch.nn.functional.relu6(x)
    if isinstance(module, torch.nn.Sequential):
        for child in module:
            x = _rounded_after_every_op(child, x)
        return x
    assert isinstance(module, _InvertedResidual)
    out = _rounded_after_every_op(module.conv, x)
    return round_(x + out) if module.use_res_connect else out


def test_emulation_on_bf16_tensors_equals_rounding_float32_after_every_op():
    from ris_core.encoders import MID_BLOCK
    from ris_core.images import open_image, square
    from ris_core.modeling import ModelSpec
    from training.data import normalize

    photos = sorted(Path(REPO / "data/demo/images").glob("*.jpg"))[:6]
    pixels = normalize(torch.stack([torch.from_numpy(np.array(square(open_image(p), 128, 80))).permute(2, 0, 1)
                                    for p in photos]), ModelSpec())
    backbone = _encoder().backbone.eval()
    with torch.no_grad():
        mid, final = backbone.forward_bf16_emulated(pixels)
        x = precision.round_to_bf16(pixels)
        for index, block in enumerate(backbone.features):
            x = _rounded_after_every_op(block, x)
            if index == MID_BLOCK:
                expected_mid = x
    assert mid.dtype == final.dtype == torch.float32
    assert torch.equal(mid, expected_mid) and torch.equal(final, x)  # bit for bit
    assert final.abs().sum() > 0


def test_a_large_batch_runs_in_cache_sized_chunks_with_each_image_s_own_maps(bf16_mode, monkeypatch):
    from ris_core import encoders
    from ris_core.images import open_image, square
    from ris_core.modeling import ModelSpec
    from training.data import normalize

    photos = sorted(Path(REPO / "data/demo/images").glob("*.jpg"))[:10]
    pixels = normalize(torch.stack([torch.from_numpy(np.array(square(open_image(p), 128, 80))).permute(2, 0, 1)
                                    for p in photos]), ModelSpec())
    bf16_mode("emulated")
    for backbone_precision in ("bf16", "fp32"):
        encoder = _encoder(backbone_precision)
        monkeypatch.setattr(encoders, "BACKBONE_CHUNK", 10**6)
        whole = encoder.backbone_maps(pixels)
        monkeypatch.setattr(encoders, "BACKBONE_CHUNK", 4)
        sizes: list[int] = []
        encoder.backbone.features[0].register_forward_pre_hook(lambda module, args, sizes=sizes:
                                                               sizes.append(len(args[0])))
        chunked = encoder.backbone_maps(pixels)
        if backbone_precision == "fp32":  # the emulation calls the blocks' parts, not the first block itself
            assert sizes == [4, 4, 2]
        for a, b in zip(whole, chunked):  # in order, each image's own maps (a kernel may differ by one bf16 ulp)
            assert a.shape == b.shape and torch.allclose(a, b, rtol=2**-7, atol=1e-6)


def test_emulation_names_what_it_cannot_emulate():
    from ris_core.encoders import _emulated

    with pytest.raises(TypeError, match="no bf16 emulation for Linear"):
        _emulated(torch.nn.Linear(2, 2), torch.zeros(1, 2))


@pytest.mark.slow
def test_training_asked_for_bf16_on_a_slow_bf16_machine_trains_and_extracts_in_fp32(tiny_catalog: Path,
                                                                                     tmp_path: Path, bf16_mode,
                                                                                     caplog):
    from training.train import main

    bf16_mode("emulated")
    run = main([*tiny_train_args(tiny_catalog, tmp_path / "runs", tmp_path / "cache", epochs=1), "--max_steps", "2"])
    info = json.loads((run / "run.json").read_text())
    assert info["args"]["precision"] == "bf16" and info["precision"] == "fp32"  # asked vs used
    assert info["model_spec"]["backbone_precision"] == "fp32"
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["encoder"]["backbone_precision"] == "fp32"
    assert "runs bf16 slowly" in caplog.text
    bf16_mode("native")  # the same command on a bf16 machine resumes the same run, with the maps it began with
    again = main([*tiny_train_args(tiny_catalog, tmp_path / "runs", tmp_path / "cache", epochs=1), "--max_steps", "2"])
    assert json.loads((again / "run.json").read_text())["model_spec"]["backbone_precision"] == "fp32"
