"""Open the paper notebook's own `captioner.pt` and caption with it through the same interface as our runs.

The notebook (a `VisionGPT2Model`) trains a timm ViT-B/16 encoder and a nanoGPT-style GPT-2 decoder whose
block N cross-attends to the output of ViT block N, and saves a bare `state_dict` with `torch.save`.
`NotebookCaptioner` rebuilds that model in plain torch with the same parameter names, so the file loads
as it is. `CHECKPOINT_LAYOUT` below is THE expected layout; a file named differently is refused with the
missing and unexpected keys listed.

Safety: `torch.load(..., weights_only=True)` only; anything that is not a plain dict of tensors (a whole
pickled model, a file whose unpickling would run code) is refused with `CheckpointError`, never executed.

Decoding (`DECODING_MODES`): the notebook generates from BOS (50256), which its training never fed to the
model, so the first word generated is spurious.
- "notebook": sampling at temperature 1 from BOS, as the notebook did; keeps the spurious first word.
- "greedy_drop_first": greedy (deterministic) from BOS, the first generated word dropped. The default.

    run = "results/runs/paper-notebook"   # written by `python -m training.import_paper_checkpoint`
    captioner = load_any_captioner(run)   # NotebookCaptionerAdapter here, Captioner for our own runs
    captioner.caption([image])
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from ris_core.captioner import CaptionBatch, Captioner
from ris_core.images import square
from ris_core.modeling import CheckpointError, ModelSpec
from ris_core.tokenizer import EOS_TOKEN_ID, encode_captions, gpt2_tokenizer

NOTEBOOK_DIR = "notebook"  # inside a run folder: model.safetensors + config.json
CONFIG_FORMAT = "ris-paper-notebook/1"  # written into notebook/config.json, checked when loading
BOS_TOKEN_ID = EOS_TOKEN_ID  # the notebook starts generation from <|endoftext|>
DEFAULT_MODE = "greedy_drop_first"
DECODING_MODES: dict[str, str] = {
    "notebook": "as the paper's notebook: sampling at temperature 1 from BOS, spurious first word kept "
                "(changes with the seed)",
    "greedy_drop_first": "greedy from BOS (deterministic), first generated word dropped because training "
                         "never saw BOS",
}

# THE expected layout of `captioner.pt`: key -> shape. "{i}" runs over blocks 0..depth-1 (the ViT and the
# decoder have the same depth: decoder block i cross-attends to ViT block i). Shape symbols: D width,
# V vocab, T n_positions, N = 1 + (image_size / patch)^2 image tokens, P patch; "3D" = 3 * D, "4D" = 4 * D.
# Linear weights are (out, in): the notebook uses nn.Linear, not GPT-2's Conv1D.
CHECKPOINT_LAYOUT: dict[str, tuple[int | str, ...]] = {
    # timm ViT-B/16 (patch_embed, cls_token, pos_embed, blocks; the notebook copies them from timm)
    "patch_embed.proj.weight": ("D", 3, "P", "P"),
    "patch_embed.proj.bias": ("D",),
    "cls_token": (1, 1, "D"),
    "pos_embed": (1, "N", "D"),
    "blocks.{i}.norm1.weight": ("D",),
    "blocks.{i}.norm1.bias": ("D",),
    "blocks.{i}.attn.qkv.weight": ("3D", "D"),
    "blocks.{i}.attn.qkv.bias": ("3D",),
    "blocks.{i}.attn.proj.weight": ("D", "D"),
    "blocks.{i}.attn.proj.bias": ("D",),
    "blocks.{i}.norm2.weight": ("D",),
    "blocks.{i}.norm2.bias": ("D",),
    "blocks.{i}.mlp.fc1.weight": ("4D", "D"),
    "blocks.{i}.mlp.fc1.bias": ("4D",),
    "blocks.{i}.mlp.fc2.weight": ("D", "4D"),
    "blocks.{i}.mlp.fc2.bias": ("D",),
    # nanoGPT-style GPT-2: self-attention after ln_1, cross-attention after ln_2, MLP after ln_3
    "transformer.wte.weight": ("V", "D"),
    "transformer.wpe.weight": ("T", "D"),
    "transformer.h.{i}.ln_1.weight": ("D",),
    "transformer.h.{i}.ln_1.bias": ("D",),
    "transformer.h.{i}.attn.c_attn.weight": ("3D", "D"),
    "transformer.h.{i}.attn.c_attn.bias": ("3D",),
    "transformer.h.{i}.attn.c_proj.weight": ("D", "D"),
    "transformer.h.{i}.attn.c_proj.bias": ("D",),
    "transformer.h.{i}.ln_2.weight": ("D",),
    "transformer.h.{i}.ln_2.bias": ("D",),
    "transformer.h.{i}.cross_attn.q.weight": ("D", "D"),
    "transformer.h.{i}.cross_attn.q.bias": ("D",),
    "transformer.h.{i}.cross_attn.k.weight": ("D", "D"),
    "transformer.h.{i}.cross_attn.k.bias": ("D",),
    "transformer.h.{i}.cross_attn.v.weight": ("D", "D"),
    "transformer.h.{i}.cross_attn.v.bias": ("D",),
    "transformer.h.{i}.cross_attn.c_proj.weight": ("D", "D"),
    "transformer.h.{i}.cross_attn.c_proj.bias": ("D",),
    "transformer.h.{i}.ln_3.weight": ("D",),
    "transformer.h.{i}.ln_3.bias": ("D",),
    "transformer.h.{i}.mlp.c_fc.weight": ("4D", "D"),
    "transformer.h.{i}.mlp.c_fc.bias": ("4D",),
    "transformer.h.{i}.mlp.c_proj.weight": ("D", "4D"),
    "transformer.h.{i}.mlp.c_proj.bias": ("D",),
    "transformer.ln_f.weight": ("D",),
    "transformer.ln_f.bias": ("D",),
}
# Keys a file may hold or not. The final ViT norm: timm has it, notebooks that copy only the blocks don't
# (both or neither). The tied head: a tied state_dict lists it, the converted file stores it once.
OPTIONAL_LAYOUT: dict[str, tuple[int | str, ...]] = {
    "norm.weight": ("D",),
    "norm.bias": ("D",),
    "lm_head.weight": ("V", "D"),
}
# Causal-mask buffers (notebook: attn.mask, nanoGPT: attn.bias): accepted and ignored, rebuilt on the fly.
IGNORED_BUFFERS: dict[str, tuple[int | str, ...]] = {
    "transformer.h.{i}.attn.mask": (1, 1, "T", "T"),
    "transformer.h.{i}.attn.bias": (1, 1, "T", "T"),
}


@dataclass
class NotebookCaptionerConfig:
    """The shape of the notebook's model; saved as notebook/config.json, enough to rebuild it."""

    depth: int = 12  # ViT blocks = decoder blocks
    width: int = 768  # ViT and decoder share it (cross-attention keys come straight from ViT tokens)
    heads: int = 12  # not visible in the weights: 64-wide heads unless told otherwise
    patch: int = 16
    image_size: int = 224
    vocab: int = 50257
    n_positions: int = 1024
    final_norm: bool = True  # whether the file holds the ViT's final `norm` (used for embeddings only)
    vit_norm_eps: float = 1e-6  # timm ViT LayerNorm
    gpt_norm_eps: float = 1e-5  # nn.LayerNorm default, as in the notebook's GPT-2 blocks
    extra: dict = field(default_factory=dict)  # free-form notes (source file, ...), never used to compute

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise CheckpointError(f"width {self.width} is not divisible by heads {self.heads}: pass heads=")
        if self.image_size % self.patch:
            raise CheckpointError(f"image_size {self.image_size} is not a multiple of patch {self.patch}")

    @property
    def image_tokens(self) -> int:
        return 1 + (self.image_size // self.patch) ** 2

    def symbols(self) -> dict[str, int]:
        d = self.width
        return {"D": d, "3D": 3 * d, "4D": 4 * d, "V": self.vocab, "T": self.n_positions,
                "N": self.image_tokens, "P": self.patch}


def expected_shapes(config: NotebookCaptionerConfig, layout: Mapping | None = None) -> dict[str, tuple[int, ...]]:
    """`CHECKPOINT_LAYOUT` (or another layout) expanded for this config: every key with its shape."""
    sym = config.symbols()
    out: dict[str, tuple[int, ...]] = {}
    for pattern, shape in (CHECKPOINT_LAYOUT if layout is None else layout).items():
        concrete = tuple(sym[s] if isinstance(s, str) else s for s in shape)
        for i in range(config.depth) if "{i}" in pattern else [None]:
            out[pattern.format(i=i) if i is not None else pattern] = concrete
    return out


# ---------------------------------------------------------------- the model


class _PatchEmbed(nn.Module):
    def __init__(self, c: NotebookCaptionerConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, c.width, kernel_size=c.patch, stride=c.patch)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, d = x.shape
    return x.view(b, t, heads, d // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, t, dh = x.shape
    return x.transpose(1, 2).reshape(b, t, h * dh)


class _VitAttention(nn.Module):
    def __init__(self, c: NotebookCaptionerConfig) -> None:
        super().__init__()
        self.heads = c.heads
        self.qkv = nn.Linear(c.width, 3 * c.width)
        self.proj = nn.Linear(c.width, c.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.proj(_merge(F.scaled_dot_product_attention(q, k, v)))


class _VitMlp(nn.Module):
    def __init__(self, c: NotebookCaptionerConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c.width, 4 * c.width)
        self.fc2 = nn.Linear(4 * c.width, c.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _VitBlock(nn.Module):
    def __init__(self, c: NotebookCaptionerConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(c.width, eps=c.vit_norm_eps)
        self.attn = _VitAttention(c)
        self.norm2 = nn.LayerNorm(c.width, eps=c.vit_norm_eps)
        self.mlp = _VitMlp(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


KV = tuple[torch.Tensor, torch.Tensor]


class _SelfAttention(nn.Module):
    def __init__(self, c: NotebookCaptionerConfig) -> None:
        super().__init__()
        self.heads = c.heads
        self.c_attn = nn.Linear(c.width, 3 * c.width)
        self.c_proj = nn.Linear(c.width, c.width)

    def forward(self, x: torch.Tensor, past: KV | None = None) -> tuple[torch.Tensor, KV]:
        q, k, v = (_heads(t, self.heads) for t in self.c_attn(x).chunk(3, dim=-1))
        if past is not None:  # generation: earlier positions' keys and values, computed once
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        new, total = q.shape[2], k.shape[2]
        # causal: new position j sees every earlier position; one new token needs no mask at all
        mask = None if new == 1 else torch.ones(new, total, dtype=torch.bool).tril(diagonal=total - new)
        return self.c_proj(_merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))), (k, v)


class _CrossAttention(nn.Module):
    def __init__(self, c: NotebookCaptionerConfig) -> None:
        super().__init__()
        self.heads = c.heads
        self.q = nn.Linear(c.width, c.width)
        self.k = nn.Linear(c.width, c.width)
        self.v = nn.Linear(c.width, c.width)
        self.c_proj = nn.Linear(c.width, c.width)

    def keys_values(self, image: torch.Tensor) -> KV:
        return _heads(self.k(image), self.heads), _heads(self.v(image), self.heads)

    def forward(self, x: torch.Tensor, image_kv: KV) -> torch.Tensor:
        q = _heads(self.q(x), self.heads)
        return self.c_proj(_merge(F.scaled_dot_product_attention(q, *image_kv)))


class _GptMlp(nn.Module):
    def __init__(self, c: NotebookCaptionerConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(c.width, 4 * c.width)
        self.c_proj = nn.Linear(4 * c.width, c.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))  # the notebook's nn.GELU(): exact, not GPT-2's tanh form


class _GptBlock(nn.Module):
    def __init__(self, c: NotebookCaptionerConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.width, eps=c.gpt_norm_eps)
        self.attn = _SelfAttention(c)
        self.ln_2 = nn.LayerNorm(c.width, eps=c.gpt_norm_eps)
        self.cross_attn = _CrossAttention(c)
        self.ln_3 = nn.LayerNorm(c.width, eps=c.gpt_norm_eps)
        self.mlp = _GptMlp(c)

    def forward(self, x: torch.Tensor, image_kv: KV, past: KV | None = None) -> tuple[torch.Tensor, KV]:
        attended, present = self.attn(self.ln_1(x), past)
        x = x + attended
        x = x + self.cross_attn(self.ln_2(x), image_kv)
        return x + self.mlp(self.ln_3(x)), present


class _EncoderView:
    """`model.encoder(pixel_values=...)`: lets `ris_core.captioner.embed_images` embed with this model."""

    def __init__(self, model: NotebookCaptioner) -> None:
        self.model = model

    def __call__(self, pixel_values: torch.Tensor) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=self.model.image_features(self.model.encode(pixel_values)))


class NotebookCaptioner(nn.Module):
    """The notebook's ViT + GPT-2 captioner, parameter for parameter (see `CHECKPOINT_LAYOUT`)."""

    def __init__(self, config: NotebookCaptionerConfig) -> None:
        super().__init__()
        c = self.config = config
        self.patch_embed = _PatchEmbed(c)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.image_tokens, c.width))
        self.blocks = nn.ModuleList(_VitBlock(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width, eps=c.vit_norm_eps) if c.final_norm else nn.Identity()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab, c.width),
            wpe=nn.Embedding(c.n_positions, c.width),
            h=nn.ModuleList(_GptBlock(c) for _ in range(c.depth)),
            ln_f=nn.LayerNorm(c.width, eps=c.gpt_norm_eps),
        ))
        self.lm_head = nn.Linear(c.width, c.vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in the notebook
        self.apply(_init_weights)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=0.02)
        self.eval()

    @property
    def encoder(self) -> _EncoderView:
        return _EncoderView(self)

    # ---- encoder

    def encode(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The output of every ViT block (decoder block i cross-attends to entry i)."""
        x = self.patch_embed.proj(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        states = []
        for block in self.blocks:
            x = block(x)
            states.append(x)
        return states

    def image_features(self, states: list[torch.Tensor]) -> torch.Tensor:
        """The final ViT tokens (after `norm` when the file has it): (B, N, D)."""
        return self.norm(states[-1])

    def image_embeddings(self, states: list[torch.Tensor]) -> torch.Tensor:
        """L2-normalised mean of the final ViT tokens: the image-kNN embedding."""
        return F.normalize(self.image_features(states).mean(dim=1), dim=1)

    # ---- decoder

    def cross_keys_values(self, states: list[torch.Tensor]) -> list[KV]:
        return [block.cross_attn.keys_values(s) for block, s in zip(self.transformer.h, states, strict=True)]

    def decode(self, input_ids: torch.Tensor, image_kv: list[KV], past: list[KV] | None = None,
               start: int = 0) -> tuple[torch.Tensor, list[KV]]:
        """Final hidden states (after ln_f) of `input_ids` at positions start.., and the new key/value cache."""
        positions = torch.arange(start, start + input_ids.shape[1])
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)
        presents = []
        for i, block in enumerate(self.transformer.h):
            x, present = block(x, image_kv[i], None if past is None else past[i])
            presents.append(present)
        return self.transformer.ln_f(x), presents

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) of every position, as the notebook's forward computes them."""
        hidden, _ = self.decode(input_ids, self.cross_keys_values(self.encode(pixel_values)))
        return self.lm_head(hidden)

    @torch.no_grad()
    def generate_ids(self, pixel_values: torch.Tensor | None = None, *, states: list[torch.Tensor] | None = None,
                     sample: bool = False, max_new_tokens: int = 32, seed: int = 0) -> torch.Tensor:
        """Token ids generated after BOS (B, L), EOS-padded once a row has ended; BOS itself not included.

        sample=True draws from softmax(logits / 1.0) with a generator seeded by `seed` (the same images in
        the same batch give the same captions); sample=False is greedy.
        """
        states = self.encode(pixel_values) if states is None else states
        image_kv = self.cross_keys_values(states)
        batch = states[-1].shape[0]
        generator = torch.Generator().manual_seed(seed) if sample else None
        step_ids = torch.full((batch, 1), BOS_TOKEN_ID, dtype=torch.long)
        finished = torch.zeros(batch, dtype=torch.bool)
        past, out = None, []
        for position in range(min(max_new_tokens, self.config.n_positions - 1)):
            hidden, past = self.decode(step_ids, image_kv, past, start=position)
            logits = self.lm_head(hidden[:, -1]).float()
            if sample:
                token = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)
            else:
                token = logits.argmax(dim=-1)
            token = torch.where(finished, torch.full_like(token, EOS_TOKEN_ID), token)
            out.append(token)
            finished |= token == EOS_TOKEN_ID
            if bool(finished.all()):
                break
            step_ids = token[:, None]
        return torch.stack(out, dim=1) if out else torch.zeros((batch, 0), dtype=torch.long)

    def generate(self, pixel_values: torch.Tensor | None = None, mode: str = DEFAULT_MODE, max_new_tokens: int = 32,
                 seed: int = 0, *, states: list[torch.Tensor] | None = None) -> list[str]:
        """Captions in one of `DECODING_MODES` ("notebook" or "greedy_drop_first")."""
        if mode not in DECODING_MODES:
            raise ValueError(f"unknown decoding mode {mode!r}; choose one of {sorted(DECODING_MODES)}")
        ids = self.generate_ids(pixel_values, states=states, sample=mode == "notebook",
                                max_new_tokens=max_new_tokens, seed=seed)
        texts = [t.strip() for t in gpt2_tokenizer().batch_decode(ids, skip_special_tokens=True)]
        return [drop_first_word(t) for t in texts] if mode == "greedy_drop_first" else texts

    @torch.no_grad()
    def reference_loss(self, references: list[str], *, states: list[torch.Tensor]) -> tuple[float, int]:
        """Summed token cross-entropy of the references, teacher-forced from BOS, and the token count.

        Inputs [BOS, t1..tn] predict [t1..tn, EOS]: per GPT-2 token with EOS included, like our runs' loss.
        """
        labels = encode_captions(references, max_length=min(48, self.config.n_positions))
        width = max(map(len, labels))
        targets = torch.full((len(labels), width), -100, dtype=torch.long)
        for row, seq in enumerate(labels):
            targets[row, : len(seq)] = torch.tensor(seq)
        inputs = torch.cat([torch.full_like(targets[:, :1], BOS_TOKEN_ID), targets[:, :-1].clamp(min=0)], dim=1)
        hidden, _ = self.decode(inputs, self.cross_keys_values(states))
        keep = targets != -100
        logits = self.lm_head(hidden[keep]).float()  # the output layer on target positions only
        loss = F.cross_entropy(logits, targets[keep], reduction="sum")
        return float(loss), int(keep.sum())


def _init_weights(module: nn.Module) -> None:
    # GPT-2's initialisation; only matters for tests, real weights come from the checkpoint
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
        nn.init.zeros_(module.bias)


def drop_first_word(text: str) -> str:
    parts = text.strip().split(maxsplit=1)
    return parts[1] if len(parts) > 1 else ""


# ---------------------------------------------------------------- reading and checking checkpoints


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A `torch.save`d state_dict as a plain dict of tensors; anything else raises CheckpointError.

    Only `weights_only=True` unpickling is used, so a file that would run code is refused, not run.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found: pass the notebook's captioner.pt")
    resave = "re-save it from the notebook with torch.save(model.state_dict(), 'captioner.pt')"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message starts with advice to pass weights_only=False: quote only the object it refused
        refused = re.search(r"[^\n.]*unsupported global[^\n]*", str(err), flags=re.IGNORECASE)
        raise CheckpointError(
            f"{path} holds pickled Python objects, not just tensors (a whole model, or code that would run "
            f"when loaded); it was refused and nothing in it was executed: {resave}"
            + (f" (torch: {refused.group(0).strip()})" if refused else "")
        ) from err
    except Exception as err:  # torch raises RuntimeError, EOFError, zipfile errors... for damaged files
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state_dict: {resave}")
    bad_keys = [f"key {k!r} (not a string)" for k in obj if not isinstance(k, str)]
    bad_values = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad_keys or bad_values:
        nested = [k for k, v in obj.items() if isinstance(v, Mapping)]
        hint = f"; the weights may be under {nested[0]!r}: save that dict alone" if nested else ""
        raise CheckpointError(
            f"{path} is not a plain dict of tensors; refused entries: {_listing(bad_values + bad_keys)}{hint}"
        )
    return dict(obj)


def infer_config(state: Mapping[str, torch.Tensor], heads: int | None = None) -> NotebookCaptionerConfig:
    """Depth, width, patch, image size, vocab and positions read from the keys and shapes.

    `heads` cannot be seen in the weights: default width // 64 (ViT-B/16 and GPT-2 use 64-wide heads).
    """
    anchors = ["transformer.wte.weight", "transformer.wpe.weight", "patch_embed.proj.weight", "pos_embed"]
    missing = [k for k in anchors if k not in state]
    if missing:
        raise CheckpointError(_layout_message(
            f"not the paper notebook's layout: {_listing(missing)} missing", missing, _unexpected(state)))
    vocab, width = state["transformer.wte.weight"].shape
    n_positions = state["transformer.wpe.weight"].shape[0]
    patch = state["patch_embed.proj.weight"].shape[-1]
    tokens = state["pos_embed"].shape[1]
    grid = math.isqrt(tokens - 1)
    if grid * grid != tokens - 1:
        raise CheckpointError(f"pos_embed has {tokens} tokens, not 1 + a square grid of patches")
    depths = {_count_blocks(state, r"blocks\.(\d+)\."), _count_blocks(state, r"transformer\.h\.(\d+)\.")}
    if len(depths) != 1:
        raise CheckpointError(
            f"the ViT and the decoder have different depths ({sorted(depths)}): the notebook pairs decoder "
            "block i with ViT block i, so they must match"
        )
    if heads is None:
        if width % 64:
            raise CheckpointError(f"width {width} is not a multiple of 64: pass the number of heads explicitly")
        heads = width // 64
    return NotebookCaptionerConfig(
        depth=depths.pop(), width=int(width), heads=heads, patch=int(patch), image_size=int(grid * patch),
        vocab=int(vocab), n_positions=int(n_positions), final_norm="norm.weight" in state or "norm.bias" in state,
    )


def check_layout(state: Mapping[str, torch.Tensor], config: NotebookCaptionerConfig) -> None:
    """Every key of `CHECKPOINT_LAYOUT` with its shape, nothing else; CheckpointError lists the differences."""
    wanted = expected_shapes(config)
    optional = expected_shapes(config, OPTIONAL_LAYOUT)
    final_norm = {k: optional.pop(k) for k in ("norm.weight", "norm.bias")}
    if config.final_norm:  # the final norm comes as a pair, or not at all
        wanted |= final_norm
    allowed = wanted | optional | expected_shapes(config, IGNORED_BUFFERS)
    missing = sorted(k for k in wanted if k not in state)
    unexpected = sorted(k for k in state if k not in allowed)
    wrong = sorted(f"{k} {tuple(state[k].shape)} != {allowed[k]}" for k in state
                   if k in allowed and tuple(state[k].shape) != allowed[k])
    if missing or unexpected or wrong:
        problems = [f"{len(missing)} missing", f"{len(unexpected)} unexpected", f"{len(wrong)} of the wrong shape"]
        raise CheckpointError(_layout_message(
            "the weights do not match the paper notebook's layout (" + ", ".join(problems) + ")",
            missing, unexpected, wrong))
    head = state.get("lm_head.weight")
    if head is not None and not torch.equal(head, state["transformer.wte.weight"]):
        raise CheckpointError("lm_head.weight differs from transformer.wte.weight: the notebook ties them "
                              "(wte = lm_head), so this file is from another model")


def _count_blocks(state: Mapping, pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _unexpected(state: Mapping) -> list[str]:
    known = tuple(p.split("{i}")[0] for p in [*CHECKPOINT_LAYOUT, *OPTIONAL_LAYOUT])
    return sorted(k for k in state if not k.startswith(known))


def _listing(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _layout_message(summary: str, missing: list[str], unexpected: list[str], wrong: list[str] | None = None) -> str:
    parts = [summary]
    if missing:
        parts.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_listing(unexpected)}")
    if wrong:
        parts.append(f"wrong shapes: {_listing(wrong)}")
    prefixes = {k.split(".", 1)[0] for k in unexpected}
    if prefixes & {"module", "_orig_mod", "model"}:
        parts.append("the keys carry a wrapper prefix (module./_orig_mod./model.): strip it and save again")
    parts.append("the expected names are listed in ris_core.paper_notebook.CHECKPOINT_LAYOUT")
    return "; ".join(parts)


def _build(state: Mapping[str, torch.Tensor], config: NotebookCaptionerConfig) -> NotebookCaptioner:
    model = NotebookCaptioner(config)
    ignored = expected_shapes(config, IGNORED_BUFFERS)
    weights = {k: v for k, v in state.items() if k not in ignored}
    weights.setdefault("lm_head.weight", weights["transformer.wte.weight"])  # stored once: it is tied
    model.load_state_dict(weights, strict=True)  # copies into fp32 parameters, whatever the file's dtype
    return model.eval()


def load_notebook_checkpoint(path: str | Path, heads: int | None = None) -> NotebookCaptioner:
    """The notebook's `captioner.pt` as a `NotebookCaptioner` (fp32, eval mode), or CheckpointError."""
    state = read_state_dict(path)
    config = infer_config(state, heads=heads)
    check_layout(state, config)
    return _build(state, config)


# ---------------------------------------------------------------- the converted folder (notebook/)


def save_notebook_dir(model: NotebookCaptioner, out_dir: str | Path, extra: dict | None = None) -> Path:
    """notebook/model.safetensors (the tied head stored once) + notebook/config.json."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = asdict(model.config) | {"format": CONFIG_FORMAT}
    if extra:
        config["extra"] = {**config.get("extra", {}), **extra}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def load_notebook_dir(model_dir: str | Path) -> NotebookCaptioner:
    """Rebuild from notebook/ (config.json + model.safetensors), checking the layout strictly."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    config_path, weights_path = model_dir / "config.json", model_dir / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise CheckpointError(f"{model_dir} needs config.json and model.safetensors: re-run "
                              "python -m training.import_paper_checkpoint")
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config_path} is not valid JSON ({err})") from err
    if raw.get("format") != CONFIG_FORMAT:
        raise CheckpointError(f"{config_path} is not a converted paper-notebook config "
                              f"(format {raw.get('format')!r}, expected {CONFIG_FORMAT!r})")
    config = NotebookCaptionerConfig(**{f.name: raw[f.name] for f in fields(NotebookCaptionerConfig) if f.name in raw})
    try:
        state = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types for truncated files
        raise CheckpointError(f"{weights_path} could not be read ({type(err).__name__}: {err})") from err
    check_layout(state, config)
    return _build(state, config)


def is_notebook_run(path: str | Path) -> bool:
    """A run folder (or notebook/ folder) holding a converted paper-notebook checkpoint."""
    path = Path(path)
    return (path / NOTEBOOK_DIR / "config.json").is_file() or (
        path.name == NOTEBOOK_DIR and (path / "config.json").is_file())


# ---------------------------------------------------------------- captioning like our runs


@dataclass
class NotebookCaptionerAdapter(Captioner):
    """A `Captioner` backed by the notebook's model: `run_batch`, `caption`, `caption_paths`, `embed_images`.

    Preprocessing: pad to a white square, `image_size` px (224), mean/std 0.5 as in the notebook's transforms.
    (The notebook itself stretched images to 224x224; padding keeps product photos' proportions, like our runs.)
    """

    mode: str = DEFAULT_MODE  # one of DECODING_MODES
    seed: int = 0  # used by the "notebook" (sampling) mode only
    can_rerank: ClassVar[bool] = False  # its model scores no candidate captions and has no beam search

    @classmethod
    def from_model(cls, model: NotebookCaptioner, name: str = "paper-notebook", mode: str = DEFAULT_MODE,
                   seed: int = 0) -> NotebookCaptionerAdapter:
        if mode not in DECODING_MODES:
            raise ValueError(f"unknown decoding mode {mode!r}; choose one of {sorted(DECODING_MODES)}")
        c = model.config
        spec = ModelSpec(  # descriptive only: what the dashboard shows about the model's shape
            encoder="paper-notebook-vit", image_size=c.image_size, multi_scale=False, vit_patch=c.patch,
            vit_layers=c.depth, vit_width=c.width, decoder="paper-notebook-gpt2", n_layer=c.depth, n_embd=c.width,
            n_head=c.heads, n_positions=c.n_positions, dropout=0.0, source_max_side=None,
        )
        return cls(model=model, spec=spec, name=name, mode=mode, seed=seed)

    @classmethod
    def load(cls, path: str | Path, mode: str = DEFAULT_MODE, seed: int = 0) -> NotebookCaptionerAdapter:
        """From an imported run folder (uses its notebook/) or from a notebook/ folder itself."""
        path = Path(path)
        model_dir = path / NOTEBOOK_DIR if (path / NOTEBOOK_DIR).is_dir() else path
        name = path.name if model_dir != path else path.parent.name
        return cls.from_model(load_notebook_dir(model_dir), name=name, mode=mode, seed=seed)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        size = self.model.config.image_size
        arrays = [np.asarray(square(im.convert("RGB"), size), dtype=np.float32) / 255.0 for im in images]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return (pixels - 0.5) / 0.5

    @torch.no_grad()
    def run_batch(self, images: list[Image.Image], references: list[str] | None = None, num_beams: int = 1,
                  max_new_tokens: int = 32) -> CaptionBatch:
        if num_beams != 1:
            raise ValueError(f"the paper notebook's decoder has no beam search (num_beams={num_beams}): pass "
                             f"num_beams=1; its decoding modes are {sorted(DECODING_MODES)}")
        states = self.model.encode(self.preprocess(images))  # the encoder runs once per batch
        out = CaptionBatch(captions=[], embeddings=self.model.image_embeddings(states).numpy().astype(np.float32))
        if references is not None:
            out.loss_sum, out.tokens = self.model.reference_loss(references, states=states)
        out.captions = self.model.generate(mode=self.mode, max_new_tokens=max_new_tokens, seed=self.seed,
                                           states=states)
        return out


def load_any_captioner(run_dir: str | Path, notebook_mode: str = DEFAULT_MODE) -> Captioner:
    """The captioner of any run folder: the notebook adapter for an imported paper notebook, else ours."""
    if is_notebook_run(run_dir):
        return NotebookCaptionerAdapter.load(run_dir, mode=notebook_mode)
    return Captioner.load(run_dir)
