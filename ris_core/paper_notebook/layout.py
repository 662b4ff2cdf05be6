"""The paper notebook's checkpoint layout (`CHECKPOINT_LAYOUT`) and model shape (`NotebookCaptionerConfig`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ris_core.errors import CheckpointError
from ris_core.tokenizer import EOS_TOKEN_ID

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
