"""A brand step before the caption: MobileNetV2's stride-32 stage, tuned to name a product's first word.

The first word of a product name is mostly its brand, and on products never seen it decides most of a caption's
CIDEr-D (bench/probe_novel_words.py). The decoder guesses it from the frozen maps; the backbone's last stage, tuned
from its ImageNet weights on the stride-16 maps as a classifier, names it more often (results/cpu-preset.md, "A
brand step before the caption"). A captioner whose model folder holds one (`training.train_brand_step` writes it)
begins each greedy caption with the word both agree on most: of the step's five likeliest words (from the photo
and its mirror image, averaged), the one with the highest sum of the step's and the decoder's log-probabilities;
the decoder writes the rest.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ris_core.encoders import MID_BLOCK, MobileNetV2Features, imagenet_mobilenet_v2_state_dict
from ris_core.errors import CheckpointError
from ris_core.files import atomic_path
from ris_core.metrics import coco_tokens

FILE = "brand_step.safetensors"  # in the model folder, beside the captioner's weights
CANDIDATES = 5  # the step's likeliest words the decoder chooses among


def first_word(text: object) -> str:
    """A name's first word as the step classifies it: lower case, punctuation dropped ("U.S." -> "us")."""
    words = coco_tokens(str(text)).split()
    return words[0] if words else ""


def written_forms(names: list[str]) -> dict[str, str]:
    """Each first word (as `first_word` normalises it) written as most of these names write it."""
    counts = Counter((first_word(name), name.split()[0]) for name in names if name.split())
    forms: dict[str, str] = {}
    for (word, written), _ in counts.most_common():
        forms.setdefault(word, written)
    return forms


class BrandStep(nn.Module):
    """The backbone's blocks after the stride-16 map and its 1x1 convolution to 1280 channels (1.7M parameters),
    then a linear layer over `words`, each a first word as training names write it."""

    def __init__(self, words: list[str]) -> None:
        super().__init__()
        if not words:
            raise ValueError("a brand step needs at least one word")
        self.words = list(words)
        self.stage = MobileNetV2Features().features[MID_BLOCK + 1 :]
        self.out = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, len(words)))

    @classmethod
    def from_imagenet(cls, words: list[str]) -> BrandStep:
        step = cls(words)
        backbone = MobileNetV2Features()
        backbone.load_state_dict(imagenet_mobilenet_v2_state_dict(), strict=True)
        step.stage.load_state_dict(backbone.features[MID_BLOCK + 1 :].state_dict())
        return step

    def forward(self, mid: torch.Tensor, final: torch.Tensor | None = None) -> torch.Tensor:
        """Logits over `words` from the stride-16 maps (B, 96, H, W); `final` is not used."""
        return self.out(self.stage(mid.float()).mean((2, 3)))

    @torch.no_grad()
    def log_probs(self, mid: torch.Tensor, mirrored_mid: torch.Tensor | None = None) -> torch.Tensor:
        """(B, words) log-probabilities, averaged with those of the mirrored photo's maps when given (on
        `grouped-cpu`'s pick set 55.7% of first words right against 54.1% from the photo alone)."""
        self.eval()
        log_probs = self(mid).log_softmax(dim=1)
        return log_probs if mirrored_mid is None else (log_probs + self(mirrored_mid).log_softmax(dim=1)) / 2

    def likeliest(self, mid: torch.Tensor, mirrored_mid: torch.Tensor | None = None,
                  k: int = CANDIDATES) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's `k` likeliest words: log-probabilities and indices into `words`, both (B, k)."""
        return self.log_probs(mid, mirrored_mid).topk(min(k, len(self.words)), dim=1)

    def save(self, model_dir: Path) -> Path:
        path = Path(model_dir) / FILE
        state = {name: tensor.detach().contiguous() for name, tensor in self.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(state, tmp, metadata={"words": json.dumps(self.words)})
        return path

    @classmethod
    def load(cls, model_dir: Path) -> BrandStep | None:
        """The step saved in `model_dir`, None if there is none; CheckpointError if it is unreadable."""
        path = Path(model_dir) / FILE
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as handle:
                words = json.loads((handle.metadata() or {})["words"])
                state = {name: handle.get_tensor(name) for name in handle.keys()}
            step = cls([str(w) for w in words])
            step.load_state_dict(state, strict=True)
        except (OSError, SafetensorError, KeyError, ValueError, TypeError, RuntimeError) as err:
            raise CheckpointError(f"{path} is not a readable brand step ({type(err).__name__}: {err}); delete it "
                                  f"to caption without one, or run training.train_brand_step again") from err
        return step.eval()
