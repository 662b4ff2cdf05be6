"""Make any transformers captioner a run: a `save_pretrained` / `Seq2SeqTrainer` folder, or a Hub model id.

    python -m training.import_checkpoint path/to/folder --out results/runs/my-captioner
    python -m training.import_checkpoint nlpconnect/vit-gpt2-image-captioning --out results/runs/vit-gpt2 \\
        --split_from results/runs/reference-cpu

The source is a `VisionEncoderDecoderModel` (any vision encoder transformers builds from its config: ViT, DeiT,
Swin, DINOv2...; a GPT-2 or other causal LM decoder with cross-attention) with its image processor and
tokenizer saved beside it; a Trainer output folder holding only checkpoint-*/ folders gives its best (or last)
one. Writes <out>/: model/ (the source's weights, configs, processor and tokenizer files, readable by all; no
pickles), split.json (copied from --split_from: the held-out products it is evaluated on), history.csv (from
`trainer_state.json` when there is one), run.json (kind "imported"). The model is loaded before anything is
written, so a folder that is not a captioner leaves no trace; an existing different run is never overwritten.
Then: `python -m training.evaluate --run <out>`, and the dashboard lists it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

from ris_core.data import Split
from ris_core.encoder_decoder import Captioner
from ris_core.errors import CheckpointError, HubUnavailable
from ris_core.files import digest, file_sha256, write_csv_atomic, write_json_atomic
from ris_core.runs import HISTORY_COLUMNS, RESULTS_DIR, RunError, borrowed_split, git_commit

logger = logging.getLogger("training.import_checkpoint")
KIND = "imported"
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")  # never copied, never opened: weights come as safetensors
TRAINER_ONLY = ("optimizer", "scheduler", "rng_state", "training_args", "trainer_state")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a folder written by save_pretrained / Seq2SeqTrainer, or a Hub model id")
    parser.add_argument("--out", type=Path, required=True, help="run folder to create (results/runs/<name>)")
    parser.add_argument("--split_from", type=Path, default=RESULTS_DIR / "runs" / "reference-cpu",
                        help="run whose split.json is copied: the held-out products the import is evaluated on")
    return parser.parse_args(argv)


def resolve_source(source: str) -> tuple[Path, dict]:
    """(local folder holding config.json, what the source was); HubUnavailable / CheckpointError otherwise."""
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{source} is a file: pass the folder save_pretrained wrote (config.json, "
                                  "model.safetensors, the image processor and tokenizer files)")
        folder = _checkpoint_folder(path)
        return folder, {"folder": str(folder.resolve())}
    if not HUB_ID.match(source):
        raise CheckpointError(f"{source} is neither a folder nor a Hub model id (owner/name)")
    return download(source), {"hub_id": source}


def download(model_id: str) -> Path:
    """The Hub model's files (no pickles) in the local Hub cache; one clear line when the Hub is unreachable."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, allow_patterns=HUB_FILES))
    except Exception as err:  # offline, unknown repo, gated, rate-limited: the hub client raises many types
        raise HubUnavailable(
            f"cannot download '{model_id}' from the Hugging Face Hub ({type(err).__name__}): on a machine with "
            f"the Hub, run `hf download {model_id} --local-dir <folder>` and pass that folder here") from err


def _checkpoint_folder(path: Path) -> Path:
    """`path`, or for a Trainer output folder its best checkpoint (trainer_state.json) or else its last one."""
    if (path / "config.json").is_file():
        return path
    checkpoints = sorted((p for p in path.glob("checkpoint-*") if (p / "config.json").is_file()),
                         key=lambda p: int(p.name.rsplit("-", 1)[-1]) if p.name.rsplit("-", 1)[-1].isdigit() else -1)
    if not checkpoints:
        raise CheckpointError(f"{path} holds no config.json (nor checkpoint-*/config.json): not a saved captioner")
    best = _trainer_state(checkpoints[-1]).get("best_model_checkpoint")
    chosen = next((p for p in checkpoints if best and Path(best).name == p.name), checkpoints[-1])
    logger.info("%s is a Trainer output folder: importing %s (%s)", path, chosen.name,
                "its best checkpoint" if chosen.name == Path(best or "").name else "its last checkpoint")
    return chosen


def _trainer_state(folder: Path) -> dict:
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def history_from_trainer_state(state: dict) -> pd.DataFrame | None:
    """One row per evaluated epoch (val loss, perplexity; the last logged train loss and learning rate)."""
    logs = [e for e in state.get("log_history", []) if isinstance(e, dict) and isinstance(e.get("epoch"), int | float)]
    evals = [e for e in logs if isinstance(e.get("eval_loss"), int | float)]
    if not evals:
        return None
    rows = []
    for entry in evals:
        epoch = entry["epoch"]
        trained = [e for e in logs if isinstance(e.get("loss"), int | float) and e["epoch"] <= epoch + 1e-9]
        last = trained[-1] if trained else {}
        rows.append({"epoch": max(1, math.ceil(epoch - 1e-6)), "val_loss": entry["eval_loss"],
                     "val_perplexity": math.exp(entry["eval_loss"]), "train_loss": last.get("loss"),
                     "train_perplexity": math.exp(last["loss"]) if last else None,
                     "learning_rate": last.get("learning_rate"), "seconds": entry.get("eval_runtime"),
                     "samples_per_second": entry.get("eval_samples_per_second")})
    frame = pd.DataFrame(rows, columns=HISTORY_COLUMNS).drop_duplicates("epoch", keep="last")
    return frame.sort_values("epoch").reset_index(drop=True)


def _model_spec(config: dict, processor) -> dict:
    """run.json's model_spec: what the dashboard shows of the model's shape."""
    encoder, decoder = config.get("encoder", {}), config.get("decoder", {})
    size = getattr(processor, "size", None) or {}
    side = size.get("height") or size.get("shortest_edge") or encoder.get("image_size") or 0

    def first(part: dict, *keys: str) -> int:
        return next((int(part[k]) for k in keys if isinstance(part.get(k), int)), 0)

    return {"encoder": str(encoder.get("model_type", "?")), "decoder": str(decoder.get("model_type", "?")),
            "image_size": int(side if isinstance(side, int) else 0),
            "n_layer": first(decoder, "n_layer", "num_hidden_layers"),
            "n_embd": first(decoder, "n_embd", "hidden_size"),
            "n_head": first(decoder, "n_head", "num_attention_heads")}


def _files_to_copy(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix not in PICKLES and not p.name.startswith(TRAINER_ONLY))


def main(argv: list[str] | None = None) -> Path:
    # 1. Where the captioner is (a folder, a Trainer output folder, or a Hub id), and where it goes
    args = parse_args(argv)
    out = args.out
    folder, origin = resolve_source(args.source)
    weights = sorted(folder.glob("*.safetensors"))
    source_key = digest([(p.name, file_sha256(p)) for p in weights])
    if out.exists() and any(out.iterdir()):
        try:
            info = json.loads((out / "run.json").read_text())
        except (OSError, ValueError):
            info = {}
        if info.get("kind") == KIND and info.get("source", {}).get("weights_digest") == source_key:
            logger.info("%s already holds this import; nothing to do", out)
            return out
        raise RunError(f"{out} already exists and holds a different run; nothing was changed. Pass another --out, "
                       "or delete that folder first")

    # 2. It must caption before anything is written: config, weights, image processor and tokenizer all load
    captioner = Captioner.load(folder)
    split, split_info = borrowed_split(args.split_from)
    split_path = args.split_from / "split.json"

    # 3. Write into a hidden sibling, move into place when complete
    tmp = out.with_name(f".{out.name}.importing-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "model").mkdir(parents=True)
        for path in _files_to_copy(folder):
            shutil.copyfile(path, tmp / "model" / path.name)
            os.chmod(tmp / "model" / path.name, 0o644)  # readable by the dashboard's user, whoever imports
        shutil.copyfile(split_path, tmp / "split.json")
        state = _trainer_state(folder)
        history = history_from_trainer_state(state)
        if history is not None:
            write_csv_atomic(tmp / "history.csv", history)
        Captioner.load(tmp / "model")  # the copy loads too (nothing it needs was left behind)
        write_json_atomic(tmp / "run.json", _run_info(out, origin, source_key, captioner, split, split_info,
                                                      args.split_from, history))
        if out.exists():
            out.rmdir()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote %s: evaluate it with python -m training.evaluate --run %s", out, out)
    return out


def _run_info(out: Path, origin: dict, source_key: str, captioner: Captioner, split: Split, split_info: dict,
              split_from: Path, history: pd.DataFrame | None) -> dict:
    config = captioner.model.config.to_dict()
    processor, tokenizer = captioner.processor, captioner.text_tokenizer
    best = history.loc[history["val_loss"].idxmin()] if history is not None else None
    spec = _model_spec(config, processor) if processor is not None else config.get("ris_model_spec", {})
    return {
        "name": out.name, "kind": KIND, "status": "complete",
        "source": {**origin, "weights_digest": source_key},
        "model": f"{spec.get('encoder')} encoder + {spec.get('decoder')} decoder (VisionEncoderDecoderModel)",
        "model_spec": {k: spec[k] for k in ("encoder", "decoder", "image_size", "n_layer", "n_embd", "n_head")
                       if k in spec},
        "parameters": sum(p.numel() for p in captioner.model.parameters()),
        **({"best_epoch": int(best["epoch"]), "best_val_loss": float(best["val_loss"]),
            "best_val_perplexity": float(best["val_perplexity"])} if best is not None else {}),
        "data": {"data_dir": split_info.get("data", {}).get("data_dir"), "split_from": str(split_from),
                 "train": len(split.train_ids), "val": len(split.val_ids)},
        "notes": [
            f"Preprocessing: its own {type(processor).__name__ if processor is not None else 'square padding'}; "
            f"text: {type(tokenizer).__name__}.",
            "history.csv comes from its trainer_state.json: the Trainer's loss per token of its own tokenizer, "
            "first token predicted from the decoder start token (as RIS Eval's own runs)." if history is not None
            else "No trainer_state.json beside the weights: no training history.",
            "Trained elsewhere on a split RIS Eval does not know: products held out by split.json may have been "
            "in its training data, so held-out scores can be optimistic.",
        ],
        "git_commit": git_commit(), "imported": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def cli(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        main(sys.argv[1:] if argv is None else argv)
    except (CheckpointError, RunError, HubUnavailable) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
