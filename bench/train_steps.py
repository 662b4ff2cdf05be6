"""One training step of the captioner on cached maps, timed: what the training probes have in common."""

from __future__ import annotations

import time

import torch

from ris_core.modeling import ModelSpec, build_captioner
from training.train import TrainableCaptioner


def trainable(spec: ModelSpec, shortlist: set[int] | None) -> tuple[TrainableCaptioner, torch.optim.Optimizer]:
    """A freshly initialised captioner in training mode, with that output shortlist (None: the full softmax),
    and its AdamW."""
    base = build_captioner(spec)
    model = TrainableCaptioner(config=base.config, encoder=base.encoder, decoder=base.decoder).train()
    if shortlist is not None:
        model.set_output_shortlist(shortlist)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def timed_step(model: TrainableCaptioner, optimizer: torch.optim.Optimizer, labels: torch.Tensor,
               mid: torch.Tensor, final: torch.Tensor, bf16: bool) -> float:
    """Seconds for forward, backward and the optimizer's update of one batch."""
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(labels=labels, mid=mid, final=final).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - started
