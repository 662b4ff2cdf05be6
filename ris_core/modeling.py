"""Build, save and load captioners: `VisionEncoderDecoderModel` with a GPT-2 decoder.

Two families, one class:
- `mobilenet_v2`: the frozen ImageNet MobileNetV2 from a PyPI wheel (offline), token head trained;
- any Hub id (`google/vit-base-patch16-224-in21k`, ...): the paper's pretrained ViT, needs the Hub.
The decoder is either a Hub GPT-2 (`gpt2`) or a GPT-2 of the given shape trained from scratch.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    DynamicCache,
    EncoderDecoderCache,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    VisionEncoderDecoderModel,
    ViTConfig,
    ViTImageProcessorPil,
    ViTModel,
)

from ris_core.construction import MODEL_CONSTRUCTION
from ris_core.encoders import MobileNetTokenEncoder, MobileNetTokenEncoderConfig
from ris_core.errors import CheckpointError, HubUnavailable
from ris_core.output_head import token_log_probs, use_shortlist_head
from ris_core.tokenizer import EOS_TOKEN_ID, gpt2_tokenizer

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
HUB_HINT = (
    "cannot reach the Hugging Face Hub to download {what}. The `paper` preset needs the Hub "
    "(and a GPU to finish in hours); offline, use `--preset cpu`, or set HF_HOME to a cache holding the weights."
)


@dataclass
class ModelSpec:
    """The captioner's shape; saved with every run, enough to rebuild the model."""

    encoder: str = "mobilenet_v2"  # "mobilenet_v2", "vit_scratch", or a Hub id of a ViT
    image_size: int = 128
    multi_scale: bool = True  # mobilenet_v2: also the 8x8 stride-16 map (64 more tokens)
    vit_patch: int = 8  # vit_scratch only
    vit_layers: int = 4
    vit_width: int = 256
    decoder: str = "scratch"  # "scratch" or a Hub id of a GPT-2
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_positions: int = 64
    dropout: float = 0.1
    source_max_side: int | None = 80  # shrink inputs to the training images' resolution first
    backbone_precision: str = "bf16"  # mobilenet_v2: the frozen maps' precision (fp32 where bf16 is slow)


def image_processor(spec: ModelSpec) -> ViTImageProcessorPil:
    imagenet = spec.encoder in ("mobilenet_v2", "vit_scratch")
    return ViTImageProcessorPil(
        do_resize=True,
        size={"height": spec.image_size, "width": spec.image_size},
        image_mean=IMAGENET_MEAN if imagenet else [0.5, 0.5, 0.5],  # in21k ViTs were trained on [-1, 1]
        image_std=IMAGENET_STD if imagenet else [0.5, 0.5, 0.5],
    )


def pixel_values(spec: ModelSpec, squares: list[Image.Image]) -> torch.Tensor:
    """`image_processor(spec)(images=squares)["pixel_values"]` bit for bit, for RGB squares already at the model's
    size (what `ris_core.images.square` gives): a uint8 pixel can take 256 values per channel, so the processor's
    rescale and normalisation are computed once for each and looked up, instead of a resize, a rescale and a
    normalisation per image. (B, 3, H, W) float32, channels-last in memory (as the backbone wants it)."""
    processor = image_processor(spec)
    if not squares or any(im.mode != "RGB" or im.size != (spec.image_size, spec.image_size) for im in squares):
        return processor(images=squares, return_tensors="pt")["pixel_values"]
    batch = np.stack([np.asarray(im) for im in squares])  # (B, H, W, 3) uint8
    table = _normalised_levels(processor.rescale_factor, tuple(processor.image_mean), tuple(processor.image_std))
    out = np.empty(batch.shape, dtype=np.float32)
    for channel in range(3):
        np.take(table[channel], batch[..., channel], out=out[..., channel])
    return torch.from_numpy(out).permute(0, 3, 1, 2)


@functools.cache
def _normalised_levels(scale: float, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256): each channel's normalised value of each uint8 level, with the processor's arithmetic (rescale in
    float64 then float32, normalise in float32)."""
    levels = (np.arange(256, dtype=np.float64) * scale).astype(np.float32)
    table = (levels[None, :] - np.asarray(mean, dtype=np.float32)[:, None]) / np.asarray(std, dtype=np.float32)[:, None]
    return table.astype(np.float32)


def _from_hub(loader, model_id: str, **kwargs):
    try:
        return loader(model_id, **kwargs)
    except OSError as err:  # transformers raises OSError for unreachable/missing repos
        raise HubUnavailable(HUB_HINT.format(what=f"'{model_id}'") + f" ({type(err).__name__})") from err


def _encoder(spec: ModelSpec, hidden: int):
    if spec.encoder == "mobilenet_v2":
        encoder = MobileNetTokenEncoder(
            MobileNetTokenEncoderConfig(hidden_size=hidden, image_size=spec.image_size, multi_scale=spec.multi_scale,
                                        backbone_precision=spec.backbone_precision)
        )
        encoder.load_imagenet_backbone()
        encoder.freeze_backbone()
        return encoder
    if spec.encoder == "vit_scratch":
        return ViTModel(
            ViTConfig(image_size=spec.image_size, patch_size=spec.vit_patch, hidden_size=spec.vit_width,
                      num_hidden_layers=spec.vit_layers, num_attention_heads=max(1, spec.vit_width // 64),
                      intermediate_size=4 * spec.vit_width),
            add_pooling_layer=False,
        )
    return _from_hub(ViTModel.from_pretrained, spec.encoder, add_pooling_layer=False)


def _decoder(spec: ModelSpec) -> GPT2LMHeadModel:
    if spec.decoder == "scratch":
        config = GPT2Config(
            vocab_size=50257, n_positions=spec.n_positions, n_embd=spec.n_embd, n_layer=spec.n_layer,
            n_head=spec.n_head, add_cross_attention=True, bos_token_id=EOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID,
            resid_pdrop=spec.dropout, embd_pdrop=spec.dropout, attn_pdrop=spec.dropout,
        )
        config._attn_implementation = "eager"  # measured here: eager + bf16 is 1.6x faster than SDPA on CPU
        return GPT2LMHeadModel(config)
    return _from_hub(GPT2LMHeadModel.from_pretrained, spec.decoder, add_cross_attention=True)


def build_captioner(spec: ModelSpec) -> VisionEncoderDecoderModel:
    """A fresh captioner: pretrained parts loaded (wheel or Hub), the rest initialised."""
    with MODEL_CONSTRUCTION:
        decoder = _decoder(spec)
        encoder = _encoder(spec, hidden=decoder.config.n_embd)
        model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)
    configure_generation(model)
    model.config.ris_model_spec = asdict(spec)
    return model


def configure_generation(model: VisionEncoderDecoderModel, max_new_tokens: int = 32) -> None:
    model.config.decoder_start_token_id = EOS_TOKEN_ID
    model.config.pad_token_id = EOS_TOKEN_ID
    model.config.eos_token_id = EOS_TOKEN_ID
    model.generation_config = GenerationConfig(
        decoder_start_token_id=EOS_TOKEN_ID, bos_token_id=EOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID,
        pad_token_id=EOS_TOKEN_ID, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False,
    )


def save_captioner(model: VisionEncoderDecoderModel, spec: ModelSpec, out_dir: Path, half: bool = True) -> None:
    """Write a complete, self-describing model folder (weights fp16 by default to keep runs small)."""
    out_dir = Path(out_dir)
    plain = VisionEncoderDecoderModel(config=model.config, encoder=model.encoder, decoder=model.decoder)
    plain.generation_config = model.generation_config
    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in plain.state_dict().items()}
    if plain.decoder.lm_head.weight is plain.decoder.transformer.wte.weight:
        state.pop("decoder.lm_head.weight")  # tied to the token embedding: store it once
    plain.save_pretrained(out_dir, state_dict=state)
    gpt2_tokenizer().save_pretrained(out_dir)
    image_processor(spec).save_pretrained(out_dir)


SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                           "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER_BYTES = 100 * 2**20
MAX_PARAMETERS = 3_000_000_000  # a config asking for more is refused before anything is allocated


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a .safetensors header, checked against the file's size before any tensor is read:
    a truncated, forged or sparse-padded file is refused here instead of allocating what its header declares."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        length = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if not 0 < length <= min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"{path.name} is not a safetensors file (its header does not fit the file)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path.name}: unreadable safetensors header ({err})") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: the safetensors header is not a JSON object")
    data_bytes, shapes = size - 8 - length, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(o) for o in entry["data_offsets"])
            nbytes = math.prod(shape) * SAFETENSORS_DTYPE_BYTES[entry["dtype"]]
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path.name}: malformed entry for tensor {name!r} ({err})") from err
        if min(shape, default=0) < 0 or not 0 <= start <= end <= data_bytes or end - start != nbytes:
            raise CheckpointError(f"{path.name}: tensor {name!r} declares {nbytes:,} bytes at {start:,}-{end:,}, "
                                  f"but the file holds {data_bytes:,} bytes of data: truncated or forged")
        shapes[name] = shape
    return shapes


def estimated_parameters(config: dict) -> int:
    """Roughly how many parameters the config's captioner has, from its sizes alone (nothing is built:
    building a model, even on the meta device, is not safe while other threads build real ones)."""
    decoder, encoder = config.get("decoder") or {}, config.get("encoder") or {}

    def size(part: dict, *keys: str, default: int = 0) -> int:
        value = next((part[k] for k in keys if isinstance(part.get(k), int) and not isinstance(part.get(k), bool)),
                     default)
        return max(0, value)

    d, layers = size(decoder, "n_embd", "hidden_size"), size(decoder, "n_layer", "num_hidden_layers")
    vocab, positions = size(decoder, "vocab_size"), size(decoder, "n_positions", "max_position_embeddings")
    h, encoder_layers = size(encoder, "hidden_size"), size(encoder, "num_hidden_layers")
    # GPT-2 with cross-attention: 4d^2 self-attention + 4d^2 cross-attention + 8d^2 MLP per block; a ViT block
    # 12h^2; the MobileNetV2 backbone 2.3M; token projections and position tables on top
    return (vocab * d + positions * d + 16 * layers * d * d + 12 * encoder_layers * h * h + 2_300_000
            + 1_400 * h + 4 * (d + h) * 1_000)


def check_weights(model_dir: Path, config: dict) -> None:
    """The weights' headers agree with their files, and declare no more than the config's model could hold."""
    declared = sum(math.prod(shape) for path in sorted(model_dir.glob("*.safetensors"))
                   for shape in safetensors_shapes(path).values())
    expected = estimated_parameters(config)
    if expected > MAX_PARAMETERS:
        raise CheckpointError(f"config.json describes a model of about {expected:,} parameters, over the "
                              f"{MAX_PARAMETERS:,} this loader accepts")
    if declared > 2 * expected + 10_000_000:
        raise CheckpointError(f"the weights declare {declared:,} parameters, the model config.json describes has "
                              f"about {expected:,}: the two do not belong together (or the file is forged)")


def load_model_dir(model_dir: Path) -> tuple[VisionEncoderDecoderModel, ModelSpec | None]:
    """Load a saved captioner in fp32 for CPU inference, or raise CheckpointError saying what is wrong.

    The spec is None for a `VisionEncoderDecoderModel` saved elsewhere (no `ris_model_spec` in its config): its
    own image processor and tokenizer, saved beside it, decide preprocessing and text (`encoder_decoder`)."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{model_dir} holds no config.json: not a saved captioner (train one, or pick another run)"
        )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config_path} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} holds a JSON {type(config).__name__}, not a model config object")
    if config.get("model_type") != "vision-encoder-decoder":
        raise CheckpointError(
            f"{model_dir} holds a '{config.get('model_type')}' model, not a vision-encoder-decoder captioner"
        )
    if not any(model_dir.glob("*.safetensors")):
        pickled = [p.name for p in model_dir.glob("*.bin")]
        raise CheckpointError(f"{model_dir} has no .safetensors weights" + (
            f" ({', '.join(pickled)} is a pickle, never opened here: re-save the model with "
            "save_pretrained(folder), which writes safetensors)" if pickled else ""))
    spec_fields = config.get("ris_model_spec", {})
    if not isinstance(spec_fields, dict) or not set(spec_fields) <= set(ModelSpec.__dataclass_fields__):
        raise CheckpointError(f"{config_path}: ris_model_spec is not a model spec of this version")
    try:
        check_weights(model_dir, config)
    except CheckpointError as err:
        raise CheckpointError(f"{model_dir}: {err}") from err
    try:
        with MODEL_CONSTRUCTION:
            model, loading = VisionEncoderDecoderModel.from_pretrained(
                model_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
            )
    except HubUnavailable:
        raise
    except Exception as err:  # safetensors/transformers raise many types for truncated or mismatched files
        raise CheckpointError(f"{model_dir}: weights could not be loaded ({type(err).__name__}: {err})") from err
    missing = [k for k in loading.get("missing_keys", []) if not k.endswith("lm_head.weight")]  # tied to wte
    if missing:
        raise CheckpointError(
            f"{model_dir}: the weights file lacks {len(missing)} tensors (e.g. {missing[0]}); it is incomplete"
        )
    model.eval()
    use_shortlist_head(model)  # trained with the output shortlist: the same logits at a seventh of the work
    if "ris_model_spec" not in config:
        return model, None
    try:
        spec = ModelSpec(**spec_fields)
    except TypeError as err:
        raise CheckpointError(f"{config_path}: ris_model_spec does not fit this version ({err})") from err
    return model, spec


def encoder_tokens(model: VisionEncoderDecoderModel, pixel_values=None, maps=None) -> torch.Tensor:
    """Encoder output projected to the decoder's width, from pixels or from cached backbone maps."""
    if maps is not None:
        hidden = model.encoder.tokens_from_maps(*maps)
    else:
        hidden = model.encoder(pixel_values=pixel_values).last_hidden_state
    if model.encoder.config.hidden_size != model.decoder.config.hidden_size:
        hidden = model.enc_to_dec_proj(hidden)
    return hidden


def is_gpt2_decoder(model: VisionEncoderDecoderModel) -> bool:
    """A GPT-2 decoder with cross-attention (ours, or e.g. nlpconnect's): the fast scoring paths below apply."""
    blocks = getattr(getattr(model.decoder, "transformer", None), "h", None)
    return blocks is not None and all(hasattr(block, "crossattention") for block in blocks)


def _shifted(labels: torch.Tensor, start_token_id: int) -> torch.Tensor:
    return torch.cat([torch.full_like(labels[:, :1], start_token_id), labels[:, :-1].clamp(min=0)], dim=1)


def token_cross_entropy(model: VisionEncoderDecoderModel, encoder_hidden: torch.Tensor,
                        labels: torch.Tensor, start_token_id: int = EOS_TOKEN_ID) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy per target token (EOS included, padding = -100 excluded) and the token count.

    The output layer runs on target positions only: on CPU that skips ~25% of the step.
    """
    decoder_input_ids = _shifted(labels, start_token_id)
    target = labels != -100
    if not is_gpt2_decoder(model):  # any other causal LM decoder: its own forward, full logits
        logits = model.decoder(input_ids=decoder_input_ids, encoder_hidden_states=encoder_hidden).logits[target]
    else:
        decoded = model.decoder.transformer(input_ids=decoder_input_ids, encoder_hidden_states=encoder_hidden)
        logits = model.decoder.lm_head(decoded.last_hidden_state[target])
    loss = torch.nn.functional.cross_entropy(logits.float(), labels[target])
    return loss, int(target.sum())


def cross_attention_cache(decoder: GPT2LMHeadModel, encoder_hidden: torch.Tensor,
                          rows: torch.Tensor) -> EncoderDecoderCache:
    """Each image's cross-attention keys and values, projected once and gathered for the rows that score it.

    Projecting them again for every candidate made a padded pass over one view's candidates 1.35x slower (bench)."""
    layers = []
    for block in decoder.transformer.h:
        attention = block.crossattention
        keys, values = attention.c_attn(encoder_hidden).split(attention.split_size, dim=2)
        shape = (*keys.shape[:-1], -1, attention.head_dim)
        layers.append((keys.view(shape).transpose(1, 2)[rows], values.view(shape).transpose(1, 2)[rows]))
    return EncoderDecoderCache(DynamicCache(), DynamicCache(layers))


def sequence_log_likelihoods(model: VisionEncoderDecoderModel, encoder_hidden: torch.Tensor,
                             labels: torch.Tensor, rows: torch.Tensor | None = None,
                             start_token_id: int = EOS_TOKEN_ID) -> torch.Tensor:
    """Summed log-probability (nats, EOS included) of each row's caption: the model's score of a candidate.

    `encoder_hidden` holds one image per row of `labels`, or, with `rows`, one per image with `rows[i]` the image
    of caption i (many candidates per image share its cross-attention keys and values). The softmax runs on
    target positions only, in chunks or on the shortlist (`ris_core.output_head`), so scoring many candidates at
    once does not hold a (positions x 50,257) matrix in memory.
    """
    if rows is None:
        rows = torch.arange(labels.shape[0])
    decoder_input_ids = _shifted(labels, start_token_id)
    target = labels != -100
    caption_of = torch.arange(labels.shape[0]).unsqueeze(1).expand_as(labels)[target]
    if not is_gpt2_decoder(model):  # any other causal LM decoder: its own forward, full logits
        logits = model.decoder(input_ids=decoder_input_ids, encoder_hidden_states=encoder_hidden[rows]).logits
        token_logp = torch.log_softmax(logits[target].float(), dim=-1).gather(1, labels[target][:, None]).squeeze(1)
        return torch.zeros(labels.shape[0]).index_add_(0, caption_of, token_logp)
    cache = cross_attention_cache(model.decoder, encoder_hidden, rows)
    # the keys and values come from the cache; the states only give the cross-attention mask its shape
    states_shape = encoder_hidden[:1].expand(labels.shape[0], -1, -1)
    hidden = model.decoder.transformer(input_ids=decoder_input_ids, encoder_hidden_states=states_shape,
                                       past_key_values=cache, use_cache=True).last_hidden_state
    states, tokens = hidden[target], labels[target]
    token_logp = token_log_probs(model.decoder.lm_head, states, tokens)
    return torch.zeros(labels.shape[0]).index_add_(0, caption_of, token_logp)
