"""A cheaper, exact output layer for captioners trained with the output shortlist (training/train.py).

Such a model's 50,257 output rows hold ~7k distinct vectors and one vector shared by every other token, so
its logits are ~7k dot products plus one, broadcast: `ShortlistHead` computes those and writes them into the
full-vocabulary logits. Greedy and beam search, likelihoods and losses see the same logits as before (up to
float rounding of the dot products), at a seventh of the output layer's multiply-adds: the layer is most of
a small decoder's work per token. A model without such a shared row keeps its own head.
"""

from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger(__name__)
MIN_SHARED = 1000  # a shared row only pays when many tokens share it


class ShortlistHead(torch.nn.Module):
    """logits[:, shortlist] = h @ W[shortlist].T; every other column = h @ shared."""

    def __init__(self, weight: torch.Tensor, shortlist: torch.Tensor, shared: torch.Tensor) -> None:
        super().__init__()
        self.vocab_size = weight.shape[0]
        self.log_shared = math.log(self.vocab_size - len(shortlist))  # tokens sharing the last row
        self.register_buffer("shortlist", shortlist, persistent=False)
        index = torch.full((self.vocab_size,), len(shortlist), dtype=torch.long)
        index[shortlist] = torch.arange(len(shortlist))
        self.register_buffer("column", index, persistent=False)  # token id -> its column in `rows`
        self.register_buffer("rows", torch.cat([weight[shortlist], shared[None]]).contiguous(), persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        small = hidden @ self.rows.T  # (..., K + 1)
        logits = small[..., -1:].expand(*small.shape[:-1], self.vocab_size).clone()
        logits[..., self.shortlist] = small[..., :-1]
        return logits

    def token_log_probs(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """log p(token | h) under the full softmax, computed on K + 1 columns (the shared one counted V - K times)."""
        small = (hidden @ self.rows.T).float()
        small[:, -1] += self.log_shared
        picked = small.gather(1, self.column[tokens][:, None]).squeeze(1)
        shared = (self.column[tokens] == len(self.shortlist)) * self.log_shared  # one of the V - K tokens
        return picked - shared - torch.logsumexp(small, dim=1)


def token_log_probs(head: torch.nn.Module, hidden: torch.Tensor, tokens: torch.Tensor,
                    chunk: int = 2048) -> torch.Tensor:
    """log p(tokens[i] | hidden[i]) for rows of decoder states, in chunks (a full softmax row is 50,257 floats)."""
    if isinstance(head, ShortlistHead):
        return head.token_log_probs(hidden, tokens)
    return torch.cat([torch.log_softmax(head(hidden[i:i + chunk]).float(), dim=-1)
                      .gather(1, tokens[i:i + chunk, None]).squeeze(1) for i in range(0, len(tokens), chunk)])


def shared_row(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(ids of the tokens with their own row, the shared row), or None when no row is shared by many tokens."""
    _, inverse, counts = torch.unique(weight, dim=0, return_inverse=True, return_counts=True)
    biggest = int(counts.argmax())
    if int(counts[biggest]) < MIN_SHARED:
        return None
    own = torch.nonzero(inverse != biggest).squeeze(1)
    return own, weight[int(torch.nonzero(inverse == biggest)[0, 0])].clone()


def use_shortlist_head(model: torch.nn.Module) -> bool:
    """Swap `model.decoder.lm_head` for a `ShortlistHead` when its weight allows it; True if swapped."""
    head = getattr(getattr(model, "decoder", None), "lm_head", None)
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return False
    with torch.no_grad():
        found = shared_row(head.weight)
        if found is None:
            return False
        own, shared = found
        model.decoder.lm_head = ShortlistHead(head.weight.detach(), own, shared)
    logger.info("output layer: %d own rows + 1 shared by %d tokens", len(own), head.weight.shape[0] - len(own))
    return True
