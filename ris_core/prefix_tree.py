"""Candidate likelihoods scored over a prefix tree: each shared prefix through the decoder once per image.

An image's reranking candidates (greedy caption, beams, neighbours' names) share long prefixes ("Nike Men Black
..."), and scoring each as its own padded row runs the decoder and the output layer's log-sum-exp again over
every shared token. Here an image's candidates become one token trie, the decoder runs once over its nodes with
a tree mask (a node attends to itself and its ancestors, position = depth: what each row would have seen), and a
candidate's score is the sum of its edges' log-probabilities. Same arithmetic as one row per candidate up to
float rounding (test against `ris_core.modeling.sequence_log_likelihoods`); for the GPT-2 decoders of
`ris_core.decoding.supports`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GPT2LMHeadModel

from ris_core.decoding import OutputColumns, _attention


@dataclass(frozen=True)
class PrefixTree:
    """One image's candidates as a trie over decoder inputs. Node 0 is the start token; node i > 0 stands for a
    prefix of some candidate, `tokens[i]` its last token. Candidate c's j-th target token is predicted from the
    node of its first j tokens: `edges` lists (node, target token, candidate) for every target of every candidate."""

    tokens: list[int]
    parents: list[int]
    depths: list[int]
    edges: list[tuple[int, int, int]]

    @classmethod
    def of(cls, candidates: list[list[int]], start_token_id: int) -> PrefixTree:
        """`candidates`: token ids of each caption as scored, end token included (`Captioner.token_ids`)."""
        tokens, parents, depths = [start_token_id], [-1], [0]
        child: dict[tuple[int, int], int] = {}
        edges = []
        for c, sequence in enumerate(candidates):
            node = 0
            for j, token in enumerate(sequence):
                edges.append((node, token, c))
                if j + 1 == len(sequence):
                    break  # the last target is never fed back
                if (node, token) not in child:
                    child[node, token] = len(tokens)
                    tokens.append(token)
                    parents.append(node)
                    depths.append(depths[node] + 1)
                node = child[node, token]
        return cls(tokens, parents, depths, edges)

    def ancestry(self, size: int) -> torch.Tensor:
        """(size, size) bool: [i, j] when node j is node i or one of its ancestors (padding nodes see themselves)."""
        mask = torch.eye(size, dtype=torch.bool)
        for node in range(1, len(self.tokens)):  # parents come before their children
            mask[node] |= mask[self.parents[node]]
        return mask


@torch.no_grad()
def tree_states(decoder: GPT2LMHeadModel, encoder_hidden: torch.Tensor, trees: list[PrefixTree]) -> torch.Tensor:
    """The decoder's final hidden state at every node, (all nodes, D), tree after tree; tree i reads the image
    `encoder_hidden[i]`. The blocks' own modules in GPT-2's order, as `ris_core.decoding.IncrementalDecoder`.

    Linear layers run on the nodes packed (trees differ in size: padding them to the largest was a third of the
    work), attention on the trees padded to the largest."""
    t = decoder.transformer
    size = max(len(tree.tokens) for tree in trees)
    sizes = torch.tensor([len(tree.tokens) for tree in trees])
    real = torch.nonzero((torch.arange(size) < sizes[:, None]).reshape(-1)).squeeze(1)  # packed -> padded slot
    masks = torch.stack([tree.ancestry(size) for tree in trees])[:, None]  # (trees, 1, size, size)
    bias = torch.zeros(masks.shape, dtype=encoder_hidden.dtype).masked_fill_(~masks, float("-inf"))
    first = t.h[0].attn
    heads, head_dim = first.num_heads, first.head_dim
    width = t.wte.weight.shape[1]
    tokens = torch.tensor([token for tree in trees for token in tree.tokens])
    hidden = t.wte(tokens) + t.wpe(torch.tensor([depth for tree in trees for depth in tree.depths]))

    def heads_of(x: torch.Tensor) -> torch.Tensor:  # packed (nodes, k x D) -> k x (trees, heads, size, head_dim)
        padded = x.new_zeros(len(trees) * size, x.shape[1])
        padded[real] = x
        return padded.view(len(trees), size, -1, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def packed(x: torch.Tensor) -> torch.Tensor:  # (trees, heads, size, head_dim) -> (nodes, D)
        return x.transpose(1, 2).reshape(len(trees) * size, width)[real]

    cross = []  # each image's cross-attention keys (transposed) and values, projected once
    for block in t.h:
        attention = block.crossattention
        keys, values = attention.c_attn(encoder_hidden).split(attention.split_size, dim=2)
        shape = (*keys.shape[:-1], heads, head_dim)
        cross.append((keys.view(shape).permute(0, 2, 3, 1), values.view(shape).transpose(1, 2)))
    for block, (keys_t, values) in zip(t.h, cross):
        query, key, value = heads_of(block.attn.c_attn(block.ln_1(hidden)))
        scores = (query @ key.transpose(-1, -2)) * block.attn.scaling + bias
        hidden = hidden + block.attn.c_proj(packed(torch.softmax(scores, dim=-1) @ value))
        (cross_query,) = heads_of(block.crossattention.q_attn(block.ln_cross_attn(hidden)))
        attended = _attention(cross_query, keys_t, values, block.crossattention.scaling)
        hidden = hidden + block.crossattention.c_proj(packed(attended))
        hidden = hidden + block.mlp(block.ln_2(hidden))
    return t.ln_f(hidden)


@torch.no_grad()
def tree_log_likelihoods(decoder: GPT2LMHeadModel, encoder_hidden: torch.Tensor,
                         trees: list[PrefixTree]) -> list[torch.Tensor]:
    """Each tree's candidates' summed log-probabilities (nats, end token included)."""
    states = tree_states(decoder, encoder_hidden, trees)
    columns = OutputColumns.of(decoder.lm_head)
    first_node = [0, *torch.tensor([len(tree.tokens) for tree in trees]).cumsum(0).tolist()]
    nodes, targets, candidates, trees_of = [], [], [], []
    for i, tree in enumerate(trees):
        node, target, candidate = zip(*tree.edges)
        nodes += [first_node[i] + n for n in node]
        targets += target
        candidates += candidate
        trees_of += [i] * len(node)
    # the output layer and its log-sum-exp once per node that predicts anything, however many edges leave it
    parents, slot = torch.unique(torch.tensor(nodes), return_inverse=True)
    log_probs = columns.log_probs(states[parents])
    picked = log_probs[slot, columns.column_of[torch.tensor(targets)]]
    counts = [tree.edges[-1][2] + 1 for tree in trees]  # candidates, in order
    offsets = torch.tensor([0, *counts]).cumsum(0)
    sums = torch.zeros(int(offsets[-1])).index_add_(0, offsets[torch.tensor(trees_of)] + torch.tensor(candidates),
                                                    picked)
    return list(sums.split(counts))
