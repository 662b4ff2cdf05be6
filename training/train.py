"""Train a captioner into a self-describing run folder; the same command resumes after a kill.

    python -m training.train --data_dir ../shared/data/fashion-product-images-small      # cpu preset, here
    python -m training.train --preset paper --data_dir /data/fashion-product-images      # GPU + Hub
    accelerate launch -m training.train --preset paper ...                                 # many GPUs

Writes results/runs/<run_name>/: run.json, split.json, history.csv, model/ (best epoch), checkpoints/; the cpu
preset then fits a brand step (training/train_brand_step.py --fit_all) into model/ and writes brand_step.json.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import Trainer, TrainerCallback, TrainingArguments, VisionEncoderDecoderModel
from transformers.modeling_outputs import Seq2SeqLMOutput
from transformers.trainer_utils import get_last_checkpoint

from ris_core.brand_step import FILE as BRAND_STEP_FILE
from ris_core.data import DataError, Split, fingerprint, load_catalog, make_split, name_key, verbatim_overlap
from ris_core.dataset_sources import SourceColumns
from ris_core.errors import CheckpointError
from ris_core.files import write_json_atomic
from ris_core.modeling import (
    HubUnavailable,
    ModelSpec,
    build_captioner,
    encoder_tokens,
    save_captioner,
    token_cross_entropy,
)
from ris_core.precision import fast_bf16
from ris_core.runs import RunError, git_commit, upsert_history_row
from ris_core.tokenizer import EOS_TOKEN_ID, encode_captions
from training.args import default_run_name, model_spec, parse_args
from training.data import (
    CaptionDataset,
    JitteredViews,
    LargerPhotos,
    LengthBucketedSampler,
    cached_backbone_maps,
    decode_images,
    make_collator,
)

logger = logging.getLogger("training.train")
# fields that may differ between the command that started a run and the one that resumes it
# the brand step is fit after the captioner and leaves it as it is: a finished run can be given one by rerunning
RESUME_MAY_DIFFER = {"results_dir", "cache_dir", "eval_batch_size", "run_name", "report_to", "brand_step_epochs"}
TENSORBOARD_DIR = "tensorboard"  # inside the run folder, with --report_to tensorboard
# arguments added after runs were already recorded, with the value those older runs implicitly used
ADDED_SINCE = {"flip_p": 0.0, "split_by": "product", "larger_images_dir": None, "larger_images_p": 0.5,
               "jitter_views": 0, "jitter_p": 0.4, "group_by_length": False}


class TrainableCaptioner(VisionEncoderDecoderModel):
    """The captioner, taking cached backbone maps as well as pixels, with an exact running train loss.

    Output shortlist: names use ~7k of GPT-2's 50,257 tokens. Every token outside the shortlist
    shares one output vector `other_embedding`, so the full softmax equals a (K+1)-way softmax whose
    last logit is h.other + log(V - K): 7x less work on the output layer, and still an exact
    distribution over all GPT-2 tokens. `sync_other_rows` writes the shared vector into the embedding
    before every evaluation and export, so the saved plain model computes exactly the same numbers.
    """

    def set_output_shortlist(self, token_ids: set[int]) -> None:
        vocab = self.decoder.config.vocab_size
        ids = torch.tensor(sorted(set(token_ids) | {EOS_TOKEN_ID}), dtype=torch.long)
        lookup = torch.full((vocab,), len(ids), dtype=torch.long)
        lookup[ids] = torch.arange(len(ids))
        self.register_buffer("shortlist", ids, persistent=False)
        self.register_buffer("shortlist_index", lookup, persistent=False)
        self.log_others = math.log(vocab - len(ids))
        self.other_embedding = torch.nn.Parameter(torch.zeros(self.decoder.config.n_embd))

    @torch.no_grad()
    def sync_other_rows(self) -> None:
        if getattr(self, "shortlist", None) is not None:
            others = self.shortlist_index == len(self.shortlist)
            wte = self.decoder.transformer.wte.weight
            wte[others] = self.other_embedding.to(wte.dtype)

    def forward(self, labels=None, mid=None, final=None, pixel_values=None, **kwargs):
        if labels is None:
            return super().forward(pixel_values=pixel_values, **kwargs)
        hidden = encoder_tokens(self, pixel_values=pixel_values, maps=(mid, final) if final is not None else None)
        if getattr(self, "shortlist", None) is None:
            loss, tokens = token_cross_entropy(self, hidden, labels)
        else:
            loss, tokens = self._shortlist_loss(hidden, labels)
        if self.training:
            self.loss_sum = getattr(self, "loss_sum", 0.0) + loss.item() * tokens
            self.token_count = getattr(self, "token_count", 0) + tokens
            self.sample_count = getattr(self, "sample_count", 0) + labels.shape[0]
            if getattr(self, "tokens_per_caption", None):
                # length-grouped batches hold 2 to 20 tokens a caption: weigh every token alike, as the per-batch
                # mean does for random batches (whose token counts barely differ), not every batch alike
                loss = loss * (tokens / (labels.shape[0] * self.tokens_per_caption))
        return Seq2SeqLMOutput(loss=loss)

    def _shortlist_loss(self, encoder_hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        inputs = torch.cat([torch.full_like(labels[:, :1], EOS_TOKEN_ID), labels[:, :-1].clamp(min=0)], dim=1)
        states = self.decoder.transformer(input_ids=inputs, encoder_hidden_states=encoder_hidden).last_hidden_state
        target = labels != -100
        h = states[target]
        weight = self.decoder.transformer.wte.weight[self.shortlist]
        logits = torch.cat([h @ weight.t(), (h @ self.other_embedding).unsqueeze(1) + self.log_others], dim=1)
        classes = self.shortlist_index[labels[target]]
        per_token = torch.nn.functional.cross_entropy(logits.float(), classes, reduction="none")
        # the bucket's probability is shared by V - K tokens: each one gets 1/(V - K) of it
        per_token = per_token + (classes == len(self.shortlist)) * self.log_others
        return per_token.mean(), int(target.sum())


@torch.no_grad()
def split_loss(model: TrainableCaptioner, dataset: CaptionDataset, collate, batch_size: int) -> float:
    """exp of this is the paper's perplexity: mean per-token cross-entropy over the whole split (fp32)."""
    was_training = model.training
    model.eval()
    model.sync_other_rows()  # held-out captions may hold tokens outside the shortlist
    total, tokens = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        loss = model(**batch).loss
        n = int((batch["labels"] != -100).sum())
        total, tokens = total + loss.item() * n, tokens + n
    model.train(was_training)
    return total / max(tokens, 1)


class RunRecorder(TrainerCallback):
    """After every epoch: validation loss, one history row, the best model exported, run.json updated."""

    def __init__(self, run_dir: Path, info: dict, spec: ModelSpec, val_set, collate, eval_batch_size: int,
                 tensorboard: bool = False) -> None:
        self.run_dir, self.info, self.spec = run_dir, info, spec
        self.val_set, self.collate, self.eval_batch_size = val_set, collate, eval_batch_size
        self.tensorboard, self.writer = tensorboard, None

    def on_train_end(self, args, state, control, **kwargs):
        if self.writer is not None:
            self.writer.close()

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        self.started = time.time()
        model.loss_sum, model.token_count, model.sample_count = 0.0, 0, 0

    def on_epoch_end(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
        seconds = time.time() - self.started
        epoch = int(round(state.epoch))
        # under `accelerate launch` each process saw its share of the batches: sum them, then one process writes
        totals = torch.tensor([model.loss_sum, model.token_count, model.sample_count], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        if not state.is_world_process_zero:
            return
        loss_sum, token_count, sample_count = totals.tolist()
        train_loss = loss_sum / max(token_count, 1)
        val_loss = split_loss(model, self.val_set, self.collate, self.eval_batch_size)
        row = {
            "epoch": epoch, "train_loss": train_loss, "train_perplexity": math.exp(train_loss),
            "val_loss": val_loss, "val_perplexity": math.exp(val_loss),
            "learning_rate": lr_scheduler.get_last_lr()[0] if lr_scheduler else args.learning_rate,
            "seconds": round(seconds, 1), "samples_per_second": round(sample_count / max(seconds, 1e-9), 1),
        }
        history = upsert_history_row(self.run_dir / "history.csv", row)
        if self.tensorboard:  # beside Trainer's per-step scalars: the epoch's row, at the step it ended on
            if self.writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), filename_suffix=".epochs")
            for key in ("epoch", "train_loss", "val_loss", "learning_rate"):
                self.writer.add_scalar(f"history/{key}", row[key], state.global_step)
            self.writer.flush()
        best = history.loc[history["val_loss"].idxmin()]
        if int(best["epoch"]) == epoch:
            model.sync_other_rows()
            tmp = self.run_dir / "model.tmp"
            save_captioner(model, self.spec, tmp)
            _replace_dir(tmp, self.run_dir / "model")
        self.info.update(best_epoch=int(best["epoch"]), best_val_loss=float(best["val_loss"]),
                         best_val_perplexity=float(best["val_perplexity"]), epochs_done=epoch)
        write_json_atomic(self.run_dir / "run.json", self.info)
        logger.info("epoch %d: train loss %.4f (ppl %.2f), val loss %.4f (ppl %.2f), %.0fs",
                    epoch, train_loss, row["train_perplexity"], val_loss, row["val_perplexity"], seconds)


class StagedUnfreezing(TrainerCallback):
    """The paper's schedule: epoch 0 cross-attention only, epoch 1 adds GPT-2, then everything."""

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        stage = int(state.epoch or 0)
        for name, param in model.named_parameters():
            cross = "crossattention" in name or "ln_cross_attn" in name or "enc_to_dec_proj" in name
            param.requires_grad = cross or (stage >= 1 and name.startswith("decoder.")) or stage >= 2


class CaptionTrainer(Trainer):
    """Trainer whose length-grouped batches come in random order (`LengthBucketedSampler`), from the caption
    lengths the dataset already holds."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or not isinstance(dataset, CaptionDataset):
            return super()._get_train_sampler(train_dataset)
        return LengthBucketedSampler([len(labels) for labels in dataset.labels],
                                     self.args.train_batch_size * self.args.gradient_accumulation_steps)


def _replace_dir(new: Path, target: Path) -> None:
    """Swap a finished folder in; at every moment either the old or the new one is complete."""
    old = target.with_name(target.name + ".old")
    if old.exists():
        _rmtree(old)
    if target.exists():
        target.rename(old)
    new.rename(target)
    if old.exists():
        _rmtree(old)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def last_complete_checkpoint(folder: Path) -> str | None:
    """Trainer writes trainer_state.json last: a checkpoint without it was cut short by a kill.

    Such a folder is renamed `incomplete-*` (kept for inspection, never resumed from).
    """
    if not folder.is_dir():
        return None
    for candidate in sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        if (candidate / "trainer_state.json").is_file():
            return get_last_checkpoint(str(folder))
        logger.warning("setting aside %s: written only in part (the run was killed while saving)", candidate)
        candidate.rename(candidate.with_name(f"incomplete-{candidate.name}-{int(time.time())}"))
    return None


def open_run_dir(run_dir: Path, resolved: dict) -> bool:
    """Create the run folder, or check it holds this same run (then resume). Never overwrites."""
    info_path = run_dir / "run.json"
    if run_dir.exists() and any(run_dir.iterdir()):
        if not info_path.is_file():
            raise RunError(f"{run_dir} is not empty and holds no run.json: choose another --run_name")
        saved = {**ADDED_SINCE, **json.loads(info_path.read_text()).get("args", {})}
        resolved = {**ADDED_SINCE, **resolved}  # an argument added since counts as its old value on both sides
        differ = sorted(k for k in set(saved) | set(resolved)
                        if k not in RESUME_MAY_DIFFER and saved.get(k) != resolved.get(k))
        if differ:  # both values: a run of an older preset resumes with its values passed as flags
            values = "; ".join(f"{k} {saved.get(k)!r} there, {resolved.get(k)!r} now" for k in differ)
            raise RunError(
                f"{run_dir} holds a different run (differs in: {values}); nothing was changed. "
                "Pass another --run_name, or that run's values as flags to resume it"
            )
        return True
    run_dir.mkdir(parents=True, exist_ok=True)
    return False


def main(argv: list[str] | None = None) -> Path:
    launched = time.strftime("%Y-%m-%dT%H:%M:%S")  # run.json's `started`: decoding and map extraction count too
    # 1. Parse input arguments, resolve the preset
    model_args, data_args, run_args = parse_args(argv)
    if run_args.report_to not in ("none", "tensorboard"):
        raise RunError(f"--report_to must be none or tensorboard, not {run_args.report_to!r}")
    if run_args.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise RunError("--report_to tensorboard needs the tensorboard package: pip install tensorboard")
    resolved = {**asdict(model_args), **asdict(data_args), **asdict(run_args)}  # as asked, before the machine's say
    if run_args.precision == "bf16" and not fast_bf16("cuda" if torch.cuda.is_available() else "cpu"):
        logger.warning("--precision bf16: this machine runs bf16 slowly (no AVX-512 or bf16 GPU; a cpu-preset step "
                       "was 17x slower than fp32 on an AVX2 CPU): training in fp32, encoder maps in fp32")
        run_args.precision = "fp32"
    spec = model_spec(model_args)
    if spec.encoder == "mobilenet_v2":
        spec = replace(spec, backbone_precision="bf16" if run_args.precision == "bf16" else "fp32")
    run_name = run_args.run_name or default_run_name(model_args, run_args)
    run_dir = Path(run_args.results_dir) / run_name
    torch.manual_seed(run_args.seed)
    # one process, or one of several under `accelerate launch`: only the main one writes the run folder
    processes = PartialState(cpu=not torch.cuda.is_available())  # without cpu=, CPU processes count as one
    main_process = processes.is_main_process

    # 2. Open (or resume) the run folder before any heavy work (the main process first; the others then find it)
    with processes.main_process_first():
        resuming = open_run_dir(run_dir, resolved) if main_process else (run_dir / "run.json").is_file()
        last_checkpoint = last_complete_checkpoint(run_dir / "checkpoints")
    if resuming and spec.encoder == "mobilenet_v2":  # keep the maps the run began with, whatever this machine does
        begun = json.loads((run_dir / "run.json").read_text()).get("model_spec", {})
        spec = replace(spec, backbone_precision=begun.get("backbone_precision", "bf16"))
    logger.info("%s run %s%s", "resuming" if resuming else "starting", run_dir,
                f" from {last_checkpoint}" if last_checkpoint else "")

    # 3. Build the model (the paper preset needs the Hub and says so if it cannot reach it)
    base = build_captioner(spec)
    model = TrainableCaptioner(config=base.config, encoder=base.encoder, decoder=base.decoder)
    model.generation_config = base.generation_config

    # 4. Load the products; decode every image once; hold out a seeded split
    columns = SourceColumns.parse(data_args.image_column, data_args.text_column, data_args.id_column,
                                  data_args.rename_column)
    with processes.main_process_first():  # the main process writes the data and feature caches, the others read
        catalog = load_catalog(data_args.data_dir, columns=columns)
        logger.info("data: %s", catalog.report.summary())
        ids = catalog.products.index.tolist()[: data_args.max_products]
        if run_args.cache_features:
            maps, broken = cached_backbone_maps(model, catalog, ids, spec, Path(data_args.cache_dir))
            kept = maps["ids"].tolist()
            if data_args.flip_p > 0:
                mirrored, _ = cached_backbone_maps(model, catalog, ids, spec, Path(data_args.cache_dir),
                                                   mirrored=True)
        else:
            pixels, kept, broken = decode_images(catalog, ids, spec)
    split_path = run_dir / "split.json"
    groups = ([name_key(n) for n in catalog.products.loc[kept, "productDisplayName"]]
              if data_args.split_by == "name" else None)
    split = Split.load(split_path) if resuming and split_path.is_file() else make_split(
        kept, data_args.val_fraction, data_args.split_seed, groups=groups)  # seeded: every process draws the same
    if main_process:
        split.save(split_path)
    larger = None
    if data_args.larger_images_dir:
        with processes.main_process_first():
            larger = larger_photo_maps(model, catalog, kept, split.train_ids, spec, data_args)
    jittered = None
    if data_args.jitter_views:
        with processes.main_process_first():
            jittered = jittered_maps(model, catalog, kept, split.train_ids, spec, data_args)

    # 5. Tokenize captions (GPT-2 BPE + EOS) and assemble the datasets
    names = catalog.products["productDisplayName"]
    row_of = {pid: row for row, pid in enumerate(kept)}

    def dataset(split_ids: list[int], augment: bool = False) -> CaptionDataset:
        rows = torch.tensor([row_of[i] for i in split_ids], dtype=torch.long)
        labels = encode_captions(names.loc[split_ids].tolist(), data_args.max_caption_tokens)
        if not run_args.cache_features:
            return CaptionDataset(labels, pixels=pixels[rows], spec=spec)
        flipped = (mirrored["mid"][rows], mirrored["final"][rows]) if augment and data_args.flip_p > 0 else None
        views = None
        if augment and larger is not None:
            views = LargerPhotos(torch.tensor([larger["row_of"].get(i, -1) for i in split_ids]), larger["maps"],
                                 larger["mirrored"], data_args.larger_images_p)
        shifted = None
        if augment and jittered is not None:
            shifted = JitteredViews(torch.tensor([jittered["row_of"].get(i, -1) for i in split_ids]),
                                    jittered["views"], data_args.jitter_p)
        return CaptionDataset(labels, maps=(maps["mid"][rows], maps["final"][rows]), spec=spec,
                              mirrored_maps=flipped, larger=views, jittered=shifted)

    train_set, val_set = dataset(split.train_ids, augment=True), dataset(split.val_ids)
    if run_args.output_shortlist:
        model.set_output_shortlist({t for seq in train_set.labels for t in seq})
    if run_args.group_by_length:
        model.tokens_per_caption = sum(map(len, train_set.labels)) / len(train_set.labels)
    collate = make_collator(spec)

    # 6. Describe the run before the first step
    info = {
        "name": run_name, "kind": "captioner", "preset": model_args.preset, "args": resolved,
        "model_spec": asdict(spec), "precision": run_args.precision, "git_commit": git_commit(), "status": "training",
        "data": {**fingerprint(kept), "data_dir": str(data_args.data_dir), "columns": asdict(columns),
                 "report": asdict(catalog.report) | {"skipped_ids": None},
                 "unreadable_images": broken, "train": len(split.train_ids), "val": len(split.val_ids),
                 "val_names_seen_in_train": verbatim_overlap(names.loc[split.train_ids].tolist(),
                                                             names.loc[split.val_ids].tolist())},
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "parameters": sum(p.numel() for p in model.parameters()),
        "started": launched,
    }
    if resuming:
        previous = json.loads((run_dir / "run.json").read_text())
        info = {**previous, **{k: v for k, v in info.items() if k not in ("started",)}}
    if main_process:
        write_json_atomic(run_dir / "run.json", info)

    # 7. Trainer: epochs, checkpoints for resuming, mixed precision where it pays
    steps_per_epoch = math.ceil(len(train_set) / run_args.batch_size)
    warmup = run_args.warmup_steps
    if warmup < 0:
        warmup = -warmup * steps_per_epoch * run_args.epochs
    on_gpu = torch.cuda.is_available()
    reporting = [] if run_args.report_to == "none" else [run_args.report_to]
    if "tensorboard" in reporting:
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run_dir / TENSORBOARD_DIR))  # Trainer's integration
    training_args = TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        num_train_epochs=run_args.epochs, max_steps=run_args.max_steps,
        per_device_train_batch_size=run_args.batch_size, learning_rate=run_args.learning_rate,
        warmup_steps=int(warmup), lr_scheduler_type=run_args.lr_scheduler, weight_decay=run_args.weight_decay,
        max_grad_norm=1.0, seed=run_args.seed,
        bf16=run_args.precision == "bf16", fp16=run_args.precision == "fp16" and on_gpu,
        save_strategy="epoch", save_total_limit=1, eval_strategy="no",
        train_sampling_strategy="group_by_length" if run_args.group_by_length else "random",
        logging_steps=50, report_to=reporting, remove_unused_columns=False, dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # under accelerate launch / torchrun: every trainable weight is used
        use_cpu=not on_gpu,
    )
    callbacks = [RunRecorder(run_dir, info, spec, val_set, collate, run_args.eval_batch_size,
                             tensorboard="tensorboard" in reporting)]
    if run_args.staged_unfreezing:
        callbacks.append(StagedUnfreezing())
    trainer = CaptionTrainer(model=model, args=training_args, train_dataset=train_set,
                             data_collator=make_collator(spec, data_args.flip_p), callbacks=callbacks)

    # 8. Train (resuming from the last whole epoch if there is one)
    trainer.train(resume_from_checkpoint=last_checkpoint)
    if not trainer.is_world_process_zero():
        return run_dir

    # 9. The brand step (the cpu preset's): the caption's first word named from the cached maps. It loads the maps
    # it needs itself; the captioner's datasets (every cached view: ~15 GB on the whole data) are let go first
    if run_args.brand_step_epochs:
        trainer = callbacks = train_set = val_set = maps = mirrored = larger = jittered = None
        gc.collect()
        fit_brand_step(run_dir, data_args, run_args.brand_step_epochs)
    info.update(status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    write_json_atomic(run_dir / "run.json", info)
    logger.info("done: %s (best epoch %s, val perplexity %.3f)", run_dir, info.get("best_epoch"),
                info.get("best_val_perplexity", float("nan")))
    return run_dir


def fit_brand_step(run_dir: Path, data_args, epochs: int) -> None:
    """Fit the run's brand step on every training product, unless a finished one of `epochs` is there already."""
    from training import train_brand_step  # imported here: it imports this module's map helpers

    summary = run_dir / train_brand_step.SUMMARY
    done = json.loads(summary.read_text()) if summary.is_file() else {}
    if (run_dir / "model" / BRAND_STEP_FILE).is_file() and done.get("fit_all") and done.get("epochs") == epochs:
        logger.info("brand step: %s has one fit on every training product for %d epochs already", run_dir, epochs)
        return
    train_brand_step.main(["--run", str(run_dir), "--data_dir", str(data_args.data_dir), "--cache_dir",
                           str(data_args.cache_dir), "--fit_all", "--epochs", str(epochs)])


def larger_photo_maps(model, catalog, ids: list[int], train_ids: list[int], spec, data_args) -> dict:
    """Cached maps of the training products that --larger_images_dir also holds (plain, and mirrored with flips).

    Extracted for every product of `ids` there, so that another split of the same data reuses the files; only
    `train_ids` are ever shown."""
    folder = Path(data_args.larger_images_dir)
    if not (folder / "images").is_dir():
        raise DataError(f"--larger_images_dir {folder}: no images/ folder (the Kaggle layout keeps images/<id>.jpg)")
    larger = replace(catalog, image_dir=folder / "images")
    training = set(train_ids)
    ids = [i for i in ids if larger.image_path(i).is_file()]
    if not training.intersection(ids):
        raise DataError(f"--larger_images_dir {folder}: none of the {len(train_ids)} training products is there")
    cache = Path(data_args.cache_dir)
    maps, _ = cached_backbone_maps(model, larger, ids, spec, cache)
    mirrored = None
    if data_args.flip_p > 0:
        flipped, _ = cached_backbone_maps(model, larger, ids, spec, cache, mirrored=True)
        mirrored = (flipped["mid"], flipped["final"])
    row_of = {int(pid): r for r, pid in enumerate(maps["ids"].tolist()) if int(pid) in training}
    logger.info("larger photos: %d of %d training products (shown with chance %.2f)", len(row_of),
                len(train_ids), data_args.larger_images_p)
    return {"row_of": row_of, "ids": maps["ids"], "maps": (maps["mid"], maps["final"]), "mirrored": mirrored}


def jittered_maps(model, catalog, ids: list[int], train_ids: list[int], spec, data_args) -> dict:
    """Cached maps of --jitter_views seeded random crops/rescalings/mirrorings of the training images.

    Extracted for every product of `ids` (each drawn from its own seed), so that another split of the same data
    reuses the files; only `train_ids` are ever shown."""
    views, held = [], None
    for seed in range(data_args.jitter_views):
        maps, _ = cached_backbone_maps(model, catalog, ids, spec, Path(data_args.cache_dir), jitter_seed=seed)
        if held is not None and not torch.equal(held, maps["ids"]):  # the same files: only a changed disk does this
            raise DataError(f"jittered view {seed} holds other products than view 0; clear {data_args.cache_dir}")
        held = maps["ids"]
        views.append((maps["mid"], maps["final"]))
    training = set(train_ids)
    row_of = {int(pid): r for r, pid in enumerate(held.tolist()) if int(pid) in training}
    logger.info("jittered views: %d of %d training products, %d views (shown with chance %.2f)", len(row_of),
                len(train_ids), len(views), data_args.jitter_p)
    return {"row_of": row_of, "ids": held, "views": views}


def cli() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        main(sys.argv[1:])
    except (DataError, RunError, HubUnavailable, CheckpointError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    cli()
