"""Read, check, convert and load the notebook's checkpoints: `captioner.pt` in, notebook/ (safetensors) out.

Safety: `torch.load(..., weights_only=True)` only; anything that is not a plain dict of tensors is refused.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path

import torch

from ris_core.construction import MODEL_CONSTRUCTION
from ris_core.errors import CheckpointError
from ris_core.files import atomic_path, write_json_atomic
from ris_core.paper_notebook.layout import (
    CHECKPOINT_LAYOUT,
    CONFIG_FORMAT,
    IGNORED_BUFFERS,
    NOTEBOOK_DIR,
    OPTIONAL_LAYOUT,
    NotebookCaptionerConfig,
    expected_shapes,
)
from ris_core.paper_notebook.model import NotebookCaptioner

logger = logging.getLogger(__name__)
WRAPPING_KEYS = ("model", "state_dict", "model_state_dict")  # {"model": state_dict, "epoch": 3, ...}
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile


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
    obj = _unwrapped(obj, path)
    bad_keys = [f"key {k!r} (not a string)" for k in obj if not isinstance(k, str)]
    bad_values = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad_keys or bad_values:
        nested = [k for k, v in obj.items() if isinstance(v, Mapping)]
        hint = f"; the weights may be under {nested[0]!r}: save that dict alone" if nested else ""
        raise CheckpointError(
            f"{path} is not a plain dict of tensors; refused entries: {_listing(bad_values + bad_keys)}{hint}"
        )
    return dict(obj)


def _unwrapped(obj: Mapping, path: Path) -> Mapping:
    """The state dict inside the common wrappers, each unwrapping said in one log line: a dict holding it under
    "model" / "state_dict" beside plain numbers (epoch, loss), and the keys' DataParallel / torch.compile prefixes."""
    inner = next((k for k in WRAPPING_KEYS if isinstance(obj.get(k), Mapping)), None)
    plain = (int, float, bool, str, type(None))
    if inner is not None and all(isinstance(v, plain) or k == inner for k, v in obj.items()):
        others = sorted(k for k in obj if k != inner)
        logger.info("%s: took the state dict under %r%s", path.name, inner,
                    f" (beside {', '.join(others)})" if others else "")
        obj = obj[inner]
    for prefix in WRAPPER_PREFIXES * 2:  # either order, e.g. _orig_mod.module.
        if obj and all(isinstance(k, str) and k.startswith(prefix) for k in obj):
            logger.info("%s: stripped the %r prefix of every key (%s)", path.name, prefix,
                        "DataParallel/DDP" if prefix == "module." else "torch.compile")
            obj = {k.removeprefix(prefix): v for k, v in obj.items()}
    return obj


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
    with MODEL_CONSTRUCTION:
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
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    config = asdict(model.config) | {"format": CONFIG_FORMAT}
    if extra:
        config["extra"] = {**config.get("extra", {}), **extra}
    write_json_atomic(out_dir / "config.json", config)
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
