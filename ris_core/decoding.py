"""Greedy and beam decoding for GPT-2 decoders with cross-attention, step by step without `generate()`.

For a 4-layer, 256-wide decoder `generate()` spends most of each step outside the model's arithmetic: building
masks, growing and reordering caches, and a full 50,257-way logit row, log-softmax and top-k per caption. Here a
step is the decoder's own modules on preallocated key/value buffers, the cross-attention keys and values are
projected once per image, the output layer runs on the shortlist's columns (`ris_core.output_head`), and finished
captions (greedy) or finished images (beams) leave the batch.

The decisions are `generate()`'s: greedy takes the argmax; beam search follows transformers' beam search with its
defaults (length_penalty 1.0, early_stopping False: the same candidates, scores and stopping rule). The arithmetic
is the same up to float rounding, so a caption differs only where two tokens tie within it (tests compare both
paths token for token; `bench/captioning.py` measures them side by side).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig, GPT2LMHeadModel

from ris_core.draft import NameDraft
from ris_core.output_head import ShortlistHead

DRAFT_TOKENS = 8  # guessed tokens checked per step of drafted greedy decoding

# generation settings this module implements at these values; a checkpoint asking for anything else uses generate()
PLAIN_GENERATION = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0,
                    "no_repeat_ngram_size": 0, "length_penalty": 1.0, "early_stopping": False, "min_length": 0,
                    "min_new_tokens": None, "bad_words_ids": None, "forced_bos_token_id": None,
                    "forced_eos_token_id": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                    "num_beam_groups": 1, "diversity_penalty": 0.0, "encoder_repetition_penalty": 1.0}


def supports(model: torch.nn.Module) -> bool:
    """A GPT-2 decoder with cross-attention whose generation config asks for plain greedy / beam search."""
    decoder = getattr(model, "decoder", None)
    blocks = getattr(getattr(decoder, "transformer", None), "h", None)
    if not isinstance(decoder, GPT2LMHeadModel) or not blocks or not all(hasattr(b, "crossattention") for b in blocks):
        return False
    if decoder.config.scale_attn_by_inverse_layer_idx or decoder.config.reorder_and_upcast_attn:
        return False
    config = getattr(model, "generation_config", None) or GenerationConfig()
    eos = config.eos_token_id
    return (not isinstance(eos, list) or len(eos) == 1) and all(
        getattr(config, name, default) in (default, None) for name, default in PLAIN_GENERATION.items())


@dataclass(frozen=True)
class OutputColumns:
    """The output layer as C distinct rows: logits = h @ weight.T, column c standing for token `tokens[c]` and
    for `exp(log_count[c])` tokens of the vocabulary in all (the shortlist's shared row stands for the rest)."""

    weight: torch.Tensor  # (C, D)
    tokens: torch.Tensor  # (C,) token id of each column (the shared row: the smallest id sharing it)
    log_count: torch.Tensor  # (C,)
    column_of: torch.Tensor  # (V,) the column of each token id

    @classmethod
    def of(cls, head: torch.nn.Module) -> OutputColumns:
        if isinstance(head, ShortlistHead):
            k = len(head.shortlist)
            first_shared = int(torch.nonzero(head.column == k)[0, 0])
            log_count = torch.zeros(k + 1)
            log_count[k] = head.log_shared
            return cls(head.rows, torch.cat([head.shortlist, torch.tensor([first_shared])]), log_count, head.column)
        if not isinstance(head, torch.nn.Linear) or head.bias is not None:
            raise TypeError(f"no column view of a {type(head).__name__} output layer")
        every = torch.arange(head.weight.shape[0])
        return cls(head.weight, every, torch.zeros(head.weight.shape[0]), every)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.weight.T

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """log p(token of column c | h) under the softmax over the whole vocabulary."""
        logits = self.logits(hidden).float()
        return logits - torch.logsumexp(logits + self.log_count, dim=-1, keepdim=True)


class IncrementalDecoder:
    """A GPT-2 decoder run one position at a time over `group` rows per image (1 for greedy, the beams for beam
    search), rows grouped by image.

    Self-attention keys/values live in buffers sized for the longest caption; cross-attention keys/values are
    projected once per image and shared by its rows. `keep_rows` reorders rows within their images (beams),
    `keep_images` drops whole images (finished ones).
    """

    def __init__(self, decoder: GPT2LMHeadModel, encoder_hidden: torch.Tensor, group: int,
                 max_positions: int) -> None:
        self.transformer, self.group = decoder.transformer, group
        first = self.transformer.h[0].attn
        self.heads, self.head_dim = first.num_heads, first.head_dim
        self.cross = []
        for block in self.transformer.h:
            attention = block.crossattention
            keys, values = attention.c_attn(encoder_hidden).split(attention.split_size, dim=2)
            shape = (*keys.shape[:-1], self.heads, self.head_dim)
            # contiguous, keys transposed: each step's products then read them in place instead of copying them
            self.cross.append((keys.view(shape).permute(0, 2, 3, 1).contiguous(),
                               values.view(shape).transpose(1, 2).contiguous()))
        buffer = (len(self.transformer.h), encoder_hidden.shape[0] * group, self.heads, max_positions, self.head_dim)
        self.keys = torch.zeros(buffer, dtype=encoder_hidden.dtype)
        self.values = torch.zeros(buffer, dtype=encoder_hidden.dtype)
        self.length = 0

    def keep_rows(self, rows: torch.Tensor) -> None:
        # only the positions written so far are copied: the rest of each buffer is never read before it is written
        filled = slice(0, self.length)
        keys = self.keys.new_empty((self.keys.shape[0], len(rows), *self.keys.shape[2:]))
        values = torch.empty_like(keys)
        keys[:, :, :, filled] = self.keys[:, rows, :, filled]
        values[:, :, :, filled] = self.values[:, rows, :, filled]
        self.keys, self.values = keys, values

    def keep_images(self, images: torch.Tensor) -> None:
        rows = (images[:, None] * self.group + torch.arange(self.group)).reshape(-1)
        self.keep_rows(rows)
        self.cross = [(k[images], v[images]) for k, v in self.cross]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """The final hidden state (rows, D) after feeding each row its next token."""
        t, position = self.transformer, self.length
        rows, width = tokens.shape[0], t.wte.weight.shape[1]
        hidden = t.wte(tokens) + t.wpe.weight[position]
        for layer, block in enumerate(t.h):
            query, key, value = block.attn.c_attn(block.ln_1(hidden)).split(width, dim=1)
            self.keys[layer, :, :, position] = key.view(rows, self.heads, self.head_dim)
            self.values[layer, :, :, position] = value.view(rows, self.heads, self.head_dim)
            past = slice(0, position + 1)  # causal: every buffered position is in the past
            attended = _attention(query.view(rows, self.heads, 1, self.head_dim),
                                  self.keys[layer, :, :, past].transpose(-1, -2), self.values[layer, :, :, past],
                                  block.attn.scaling)
            hidden = hidden + block.attn.c_proj(attended.reshape(rows, width))
            # an image's rows (its beams) query its keys together: (images, heads, group, head_dim)
            cross_query = block.crossattention.q_attn(block.ln_cross_attn(hidden))
            cross_query = cross_query.view(-1, self.group, self.heads, self.head_dim).transpose(1, 2)
            attended = _attention(cross_query, *self.cross[layer], block.crossattention.scaling)
            hidden = hidden + block.crossattention.c_proj(attended.transpose(1, 2).reshape(rows, width))
            hidden = hidden + block.mlp(block.ln_2(hidden))
        self.length += 1
        return t.ln_f(hidden)

    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        """The final hidden states (rows, m, D) after feeding each row m tokens at once, each position attending
        to the buffered ones and to those before it. `length` may be set back afterwards to
        forget the last positions: they are overwritten before they are read again."""
        t, start = self.transformer, self.length
        rows, m = tokens.shape
        width = t.wte.weight.shape[1]
        hidden = t.wte(tokens) + t.wpe.weight[start:start + m]
        # position i of the new ones sees the buffered positions and the new ones up to itself
        future = torch.ones(m, start + m, dtype=torch.bool).triu(start + 1)
        for layer, block in enumerate(t.h):
            query, key, value = block.attn.c_attn(block.ln_1(hidden)).split(width, dim=2)
            self.keys[layer, :, :, start:start + m] = key.view(rows, m, self.heads, self.head_dim).transpose(1, 2)
            self.values[layer, :, :, start:start + m] = value.view(rows, m, self.heads, self.head_dim).transpose(1, 2)
            past = slice(0, start + m)
            scores = (query.view(rows, m, self.heads, self.head_dim).transpose(1, 2)
                      @ self.keys[layer, :, :, past].transpose(-1, -2)) * block.attn.scaling
            attended = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ self.values[layer, :, :, past]
            hidden = hidden + block.attn.c_proj(attended.transpose(1, 2).reshape(rows, m, width))
            # an image's rows query its keys together: (images, heads, group * m, head_dim)
            cross_query = block.crossattention.q_attn(block.ln_cross_attn(hidden))
            cross_query = cross_query.view(-1, self.group * m, self.heads, self.head_dim).transpose(1, 2)
            attended = _attention(cross_query, *self.cross[layer], block.crossattention.scaling)
            hidden = hidden + block.crossattention.c_proj(attended.transpose(1, 2).reshape(rows, m, width))
            hidden = hidden + block.mlp(block.ln_2(hidden))
        self.length += m
        return t.ln_f(hidden)


def _attention(query: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
    """GPT-2's eager attention, softmax(q k^T * scaling) v: query (batch, heads, queries, head_dim), keys_t
    (batch, heads, head_dim, keys), values (batch, heads, keys, head_dim)."""
    return torch.softmax((query @ keys_t) * scaling, dim=-1) @ values


@torch.no_grad()
def greedy(decoder: GPT2LMHeadModel, encoder_hidden: torch.Tensor, start_token_id: int, eos_token_id: int,
           max_new_tokens: int, prefixes: list[list[int]] | None = None) -> list[list[int]]:
    """Each image's greedy caption as token ids (end token excluded). `prefixes`: each image's forced beginning
    (token ids, part of its caption; a brand step's word), the rest decoded greedily after it; images whose
    prefixes are as long are decoded together."""
    if prefixes is None or not any(prefixes):
        return _greedy(decoder, encoder_hidden, start_token_id, eos_token_id, max_new_tokens)
    if len(prefixes) != encoder_hidden.shape[0]:
        raise ValueError(f"{len(prefixes)} prefixes for {encoder_hidden.shape[0]} images")
    out: list[list[int]] = [[] for _ in prefixes]
    by_length: dict[int, list[int]] = {}
    for image, prefix in enumerate(prefixes):
        by_length.setdefault(len(prefix), []).append(image)
    for length, images in by_length.items():
        forced = torch.tensor([prefixes[i] for i in images], dtype=torch.long).reshape(len(images), length)
        found = _greedy(decoder, encoder_hidden[images], start_token_id, eos_token_id, max_new_tokens,
                        forced if length else None)
        for image, tokens in zip(images, found):
            out[image] = tokens
    return out


def _greedy(decoder: GPT2LMHeadModel, encoder_hidden: torch.Tensor, start_token_id: int, eos_token_id: int,
            max_new_tokens: int, prefix: torch.Tensor | None = None) -> list[list[int]]:
    """`greedy` for images with forced prefixes of one length (`prefix`: (images, m) token ids) or none."""
    images = encoder_hidden.shape[0]
    steps = min(max_new_tokens, decoder.config.n_positions)
    if prefix is not None and prefix.shape[1] >= steps:
        return [row[:steps] for row in prefix.tolist()]
    columns = OutputColumns.of(decoder.lm_head)
    state = IncrementalDecoder(decoder, encoder_hidden, 1, steps)
    start = torch.full((images,), start_token_id, dtype=torch.long)
    if prefix is None:
        forced, hidden = 0, state.step(start)
        out: list[list[int]] = [[] for _ in range(images)]
    else:  # the start token and the prefix in one pass; the next token is chosen after the prefix's last
        forced, hidden = prefix.shape[1], state.extend(torch.cat([start[:, None], prefix], dim=1))[:, -1]
        out = prefix.tolist()
    image_of_row = torch.arange(images)
    ended = torch.zeros(images, dtype=torch.bool)
    for left in range(steps - forced, 0, -1):
        chosen = columns.tokens[columns.logits(hidden).argmax(dim=-1)]
        going = ~ended & (chosen != eos_token_id)
        for image, token in zip(image_of_row[going].tolist(), chosen[going].tolist()):
            out[image].append(token)
        ended |= ~going
        if bool(ended.all()) or left == 1:
            break
        # ended rows are fed their end token and ignored; once a quarter of the rows have ended they leave the
        # batch (dropping each at once would copy the key/value buffers at almost every step)
        if 4 * int(ended.sum()) >= len(ended):
            kept = torch.nonzero(~ended).squeeze(1)
            state.keep_images(kept)
            image_of_row, chosen, ended = image_of_row[kept], chosen[kept], ended[kept]
        hidden = state.step(chosen)
    return out


@torch.no_grad()
def prefix_log_probs(decoder: GPT2LMHeadModel, encoder_hidden: torch.Tensor, start_token_id: int,
                     prefixes: list[list[int]], group: int = 1) -> torch.Tensor:
    """(rows,) the decoder's log-probability of each row's prefix (non-empty token ids): how likely it finds a
    caption beginning so. `group` rows per image, grouped by image (an image's candidate first words); all in one
    pass, shorter prefixes padded (a position never sees those after it)."""
    if len(prefixes) != encoder_hidden.shape[0] * group:
        raise ValueError(f"{len(prefixes)} prefixes for {encoder_hidden.shape[0]} images of {group}")
    if not all(prefixes):
        raise ValueError(f"prefix {[len(p) for p in prefixes].index(0)} is empty")
    columns = OutputColumns.of(decoder.lm_head)
    longest = max(map(len, prefixes))
    forced = torch.full((len(prefixes), longest), start_token_id, dtype=torch.long)
    real = torch.zeros(len(prefixes), longest, dtype=torch.bool)
    for row, prefix in enumerate(prefixes):
        forced[row, : len(prefix)], real[row, : len(prefix)] = torch.tensor(prefix), True
    state = IncrementalDecoder(decoder, encoder_hidden, group, longest + 1)
    hidden = state.extend(torch.cat([torch.full((len(prefixes), 1), start_token_id), forced], dim=1))[:, :-1]
    # the output layer (most of the work) only where a prefix token is: not on the padding
    log_probs = columns.log_probs(hidden[real]).gather(-1, columns.column_of[forced[real]][:, None])[:, 0]
    row_of = torch.arange(len(prefixes))[:, None].expand(-1, longest)
    return torch.zeros(len(prefixes), dtype=log_probs.dtype).index_add_(0, row_of[real], log_probs)


@torch.no_grad()
def drafted_greedy(decoder: GPT2LMHeadModel, encoder_hidden: torch.Tensor, start_token_id: int, eos_token_id: int,
                   max_new_tokens: int, draft: NameDraft, draft_tokens: int = DRAFT_TOKENS,
                   prefix: list[int] | None = None) -> list[int]:
    """One image's greedy caption as token ids (end token excluded), checking `draft`'s guess of how it goes on at
    each step: the model's own choice after every position, kept up to the first guessed token it would not have
    chosen (speculative decoding with a draft that costs no model). The same tokens as `greedy`, but where two tie
    within float rounding (a step over several positions rounds differently; tests compare both paths).
    `prefix`: the caption's forced beginning, as in `greedy`."""
    if encoder_hidden.shape[0] != 1:
        raise ValueError(f"drafted greedy decoding takes one image, not {encoder_hidden.shape[0]}")
    steps = min(max_new_tokens, decoder.config.n_positions)
    columns = OutputColumns.of(decoder.lm_head)
    state = IncrementalDecoder(decoder, encoder_hidden, 1, steps)
    out: list[int] = list(prefix or [])[:steps]
    last = start_token_id
    if out:
        state.extend(torch.tensor([[start_token_id, *out[:-1]]]))
        last = out[-1]
    while len(out) < steps:  # the buffer holds the start token and out[:-1]: state.length == len(out)
        guess = draft.propose(out, min(draft_tokens, steps - len(out) - 1))
        hidden = state.extend(torch.tensor([[last, *guess]]))[0]
        chosen = columns.tokens[columns.logits(hidden).argmax(dim=-1)].tolist()  # the model's token after each
        kept = 0
        while kept < len(guess) and guess[kept] == chosen[kept] != eos_token_id:
            kept += 1
        state.length -= len(guess) - kept  # forget the positions of the guessed tokens it would not have chosen
        for token in chosen[: kept + 1]:
            if token == eos_token_id:
                return out
            out.append(token)
        last = out[-1]
    return out


@torch.no_grad()
def beam_search(decoder: GPT2LMHeadModel, encoder_hidden: torch.Tensor, num_beams: int, start_token_id: int,
                eos_token_id: int, max_new_tokens: int) -> list[list[list[int]]]:
    """Each image's `num_beams` hypotheses (token ids, end token excluded), best first, as transformers' beam
    search ranks them with its defaults; an image leaves the batch once its finished hypotheses cannot change.

    With the shortlist head, the tokens sharing its last row count as one candidate (the smallest id): they tie,
    and a token the captioner never saw in training among the 2 x num_beams best continuations does not occur."""
    images, n = encoder_hidden.shape[0], num_beams
    steps = min(max_new_tokens, decoder.config.n_positions)
    if steps < 1:
        raise ValueError(f"beam search needs at least one new token, not {max_new_tokens}")
    max_length = 1 + steps  # the start token counts, as in generate()
    columns = OutputColumns.of(decoder.lm_head)
    width = len(columns.tokens)
    state = IncrementalDecoder(decoder, encoder_hidden, n, steps)
    active = torch.arange(images)  # image of each group of n rows still searching
    running = torch.full((images, n, max_length), eos_token_id, dtype=torch.long)
    running[:, :, 0] = start_token_id
    running_scores = torch.zeros(images, n)
    running_scores[:, 1:] = -1e9  # the n beams start identical: only the first may expand
    finished = running.clone()
    finished_scores = torch.full((images, n), -1e9)
    finished_done = torch.zeros(images, n, dtype=torch.bool)
    settled: dict[int, torch.Tensor] = {}  # image -> its n finished hypotheses, best first
    for length in range(1, max_length):  # `length` tokens so far, start token included
        groups = len(active)
        last = running[:, :, length - 1].reshape(-1)
        log_probs = columns.log_probs(state.step(last)).view(groups, n, width) + running_scores[:, :, None]
        top_scores, top = torch.topk(log_probs.view(groups, n * width), k=2 * n)
        beam, token = top // width, columns.tokens[top % width]
        candidates = torch.gather(running, 1, beam[:, :, None].expand(-1, -1, max_length)).clone()
        candidates[:, :, length] = token
        stops = (token == eos_token_id) | (length + 1 >= max_length)
        # the n best candidates that go on...
        keep = torch.topk(top_scores + stops * -1e9, k=n).indices
        running = torch.gather(candidates, 1, keep[:, :, None].expand(-1, -1, max_length))
        running_scores = torch.gather(top_scores + stops * -1e9, 1, keep)
        # ... and those among the first n that end, normalised by their length, merged with the finished ones
        ending = stops & (torch.arange(2 * n) < n)
        normalised = top_scores / length + (~ending) * -1e9
        merged_scores = torch.cat([finished_scores, normalised], dim=1)
        best = torch.topk(merged_scores, k=n).indices
        finished = torch.gather(torch.cat([finished, candidates], dim=1), 1,
                                best[:, :, None].expand(-1, -1, max_length))
        finished_scores = torch.gather(merged_scores, 1, best)
        finished_done = torch.gather(torch.cat([finished_done, ending], dim=1), 1, best)
        # an image is settled once no running beam can beat its worst finished hypothesis (generate()'s heuristic)
        worst = torch.where(finished_done, finished_scores.min(dim=1, keepdim=True).values, -1e9)
        open_ = (running_scores[:, :1] / length > worst).any(dim=1)
        if length + 1 >= max_length or bool(stops.all()):
            open_[:] = False
        for group in torch.nonzero(~open_).squeeze(1).tolist():
            settled[int(active[group])] = finished[group]
        if not bool(open_.any()):
            break
        state.keep_rows(((torch.arange(groups) * n)[:, None] + torch.gather(beam, 1, keep)).reshape(-1))
        if not bool(open_.all()):
            still = torch.nonzero(open_).squeeze(1)
            state.keep_images(still)
            active, running, running_scores = active[still], running[still], running_scores[still]
            finished, finished_scores, finished_done = finished[still], finished_scores[still], finished_done[still]
    return [[_until_eos(seq[1:].tolist(), eos_token_id) for seq in settled[image]] for image in range(images)]


def _until_eos(tokens: list[int], eos_token_id: int) -> list[int]:
    return tokens[: tokens.index(eos_token_id)] if eos_token_id in tokens else tokens
