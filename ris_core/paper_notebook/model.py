"""The notebook's ViT + GPT-2 captioner in plain torch, parameter for parameter (names as in `CHECKPOINT_LAYOUT`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ris_core.paper_notebook.layout import BOS_TOKEN_ID, DECODING_MODES, DEFAULT_MODE, NotebookCaptionerConfig
from ris_core.tokenizer import EOS_TOKEN_ID, encode_captions, gpt2_tokenizer

LOSS_DEFINITIONS = ("ris", "notebook")  # see NotebookCaptioner.reference_loss


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
    def reference_loss(self, references: list[str], *, states: list[torch.Tensor],
                       definition: str = "ris") -> tuple[float, int]:
        """Summed token cross-entropy of the references, teacher-forced, and the token count.

        definition="ris": inputs [BOS, t1..tn] predict [t1..tn, EOS], per GPT-2 token with EOS included, like our
        runs' loss. definition="notebook": inputs [t1..tn] predict [t2..tn, EOS], as the notebook trains and
        reports (its Table I): the first caption token is given, never predicted.
        """
        if definition not in LOSS_DEFINITIONS:
            raise ValueError(f"unknown loss definition {definition!r}; choose one of {sorted(LOSS_DEFINITIONS)}")
        labels = encode_captions(references, max_length=min(48, self.config.n_positions))
        width = max(map(len, labels))
        targets = torch.full((len(labels), width), -100, dtype=torch.long)
        for row, seq in enumerate(labels):
            targets[row, : len(seq)] = torch.tensor(seq)
        inputs = torch.cat([torch.full_like(targets[:, :1], BOS_TOKEN_ID), targets[:, :-1].clamp(min=0)], dim=1)
        if definition == "notebook":  # drop BOS: t1 is the first input, t2 the first target
            inputs, targets = inputs[:, 1:], targets[:, 1:]
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
