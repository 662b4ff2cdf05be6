"""The shortlist output head (ris_core/output_head.py) gives the full output layer's numbers for less work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ris_core.encoder_decoder import Captioner
from ris_core.images import open_image
from ris_core.output_head import ShortlistHead, token_log_probs, use_shortlist_head


class Decoder(torch.nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.lm_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.lm_head.weight.data.copy_(weight)


class Model(torch.nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.decoder = Decoder(weight)


def shared_weight(vocab: int = 3000, width: int = 16, own: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, width, generator=generator)
    ids = torch.randperm(vocab, generator=generator)[:own].sort().values
    shared = torch.randn(width, generator=generator)
    weight[[i for i in range(vocab) if i not in set(ids.tolist())]] = shared
    return weight, ids


def test_the_head_reproduces_the_full_logits_and_log_probabilities() -> None:
    weight, ids = shared_weight()
    model = Model(weight)
    full = model.decoder.lm_head
    assert use_shortlist_head(model) and isinstance(model.decoder.lm_head, ShortlistHead)
    hidden = torch.randn(50, 16)
    torch.testing.assert_close(model.decoder.lm_head(hidden), full(hidden), rtol=1e-5, atol=1e-5)
    tokens = torch.cat([ids[:25], torch.tensor([i for i in range(3000) if i not in set(ids.tolist())][:25])])
    expected = torch.log_softmax(full(hidden), dim=-1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(token_log_probs(model.decoder.lm_head, hidden, tokens), expected, rtol=1e-5,
                               atol=1e-4)
    torch.testing.assert_close(token_log_probs(full, hidden, tokens), expected)  # the generic path


def test_a_head_without_a_widely_shared_row_is_kept() -> None:
    model = Model(torch.randn(3000, 16))
    head = model.decoder.lm_head
    assert not use_shortlist_head(model) and model.decoder.lm_head is head


@pytest.mark.slow
def test_a_trained_run_captions_and_scores_the_same_with_the_head(tiny_run: Path, tiny_catalog: Path) -> None:
    fast, plain = Captioner.load(tiny_run), Captioner.load(tiny_run)
    plain.model.decoder.lm_head = _full_head(plain.model)
    assert isinstance(fast.model.decoder.lm_head, ShortlistHead)
    images = [open_image(p) for p in sorted((tiny_catalog / "images").glob("*.jpg"))[:4]]
    assert len(images) == 4
    assert fast.run_batch(images).captions == plain.run_batch(images).captions
    assert fast.n_best(images, 3) == plain.n_best(images, 3)
    texts = [["Red Shirt", "Blue Jeans"]] * len(images)
    for a, b in zip(fast.log_likelihoods(images, texts), plain.log_likelihoods(images, texts), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3)


def _full_head(model: torch.nn.Module) -> torch.nn.Linear:
    wte = model.decoder.transformer.wte.weight
    head = torch.nn.Linear(wte.shape[1], wte.shape[0], bias=False)
    head.weight = wte
    return head
