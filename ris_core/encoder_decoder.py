"""The captioner of a run's model/ folder: a `VisionEncoderDecoderModel`, batched, greedy by default and
deterministic, with beam n-best and candidate likelihoods for reranking and pooled embeddings for image kNN.

Ours (trained here, `ris_model_spec` in its config) pads images to a white square and uses the GPT-2 BPE; any
other (saved by `save_pretrained` or `Seq2SeqTrainer`, imported with `training.import_checkpoint`) uses the
image processor and tokenizer saved beside it."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import AutoImageProcessor, AutoTokenizer
from transformers.modeling_outputs import BaseModelOutput

from ris_core import decoding
from ris_core.allocator import keep_freed_memory
from ris_core.brand_step import BrandStep
from ris_core.captioning import CaptionBatch, CaptionerBase
from ris_core.draft import NameDraft
from ris_core.encoding_cache import EncodingCache, Parts
from ris_core.errors import CheckpointError
from ris_core.files import digest
from ris_core.images import SHRINK_NAME, square
from ris_core.modeling import (
    ModelSpec,
    image_processor,
    load_model_dir,
    pixel_values,
    sequence_log_likelihoods,
    token_cross_entropy,
)
from ris_core.precision import fast_bf16
from ris_core.prefix_tree import PrefixTree, tree_log_likelihoods
from ris_core.tokenizer import EOS_TOKEN_ID, encode_captions, gpt2_tokenizer

logger = logging.getLogger(__name__)
LIKELIHOOD_CHUNK = 64  # candidate captions per decoder pass when scoring
TREE_CHUNK = 32  # images per decoder pass when scoring their candidates' prefix trees


@dataclass(frozen=True)
class Encoded:
    """A batch of images after the encoder: pass it instead of the images to skip encoding them again."""

    raw: torch.Tensor  # encoder tokens, as generate() takes them
    hidden: torch.Tensor  # the same at the decoder's width (cross-attention input)
    pooled: torch.Tensor  # (B, D) image embedding before normalisation
    mid: torch.Tensor | None = None  # the frozen backbone's stride-16 maps (ours): what a brand step reads


@dataclass
class Captioner(CaptionerBase):
    model: torch.nn.Module
    spec: ModelSpec | None  # None: a captioner from elsewhere, with its own `processor` and `tokenizer`
    name: str = "captioner"
    stats: dict = field(default_factory=dict)
    processor: Any = None  # the folder's image processor (captioners from elsewhere only)
    tokenizer: Any = None  # the folder's tokenizer (captioners from elsewhere only; ours use the GPT-2 BPE)
    can_rerank: ClassVar[bool] = True  # n_best and log_likelihoods work with this model (ris_core/rerank.py)
    fast_decoding: bool = True  # ris_core.decoding where the model allows it; False: transformers' generate()
    tree_scoring: bool = True  # with fast decoding, candidates scored over prefix trees; False: one row each
    encodings: EncodingCache | None = None  # set: images met before skip the encoder (an evaluation sets one)
    draft: NameDraft | None = None  # set: a single image's greedy caption checks guesses from these names
    brand_step: BrandStep | None = None  # set: greedy captions begin with its word (ris_core/brand_step.py)
    _word_tokens: dict[str, list[int]] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: str | Path) -> Captioner:
        """From a run folder (uses its model/) or a model folder; CheckpointError says what is wrong."""
        keep_freed_memory()  # a process that runs a captioner reuses its activations' memory (ris_core/allocator.py)
        path = Path(path)
        model_dir = path / "model" if (path / "model").is_dir() or (path / "run.json").is_file() else path
        if not model_dir.is_dir():
            raise CheckpointError(f"{path} has no model/ folder: this run has no checkpoint to caption with")
        model, spec = load_model_dir(model_dir)
        if spec is not None:
            brand_step = BrandStep.load(model_dir)
            if brand_step is not None and not (hasattr(model.encoder, "backbone_maps") and decoding.supports(model)):
                raise CheckpointError(f"{model_dir} has a brand step, which needs a MobileNetV2 encoder and a "
                                      f"GPT-2 decoder that decodes with ris_core.decoding")
            return cls(model=model, spec=spec, name=path.name, brand_step=brand_step)
        processor, tokenizer = _saved_text_and_image_parts(model_dir)
        _fill_generation_ids(model, tokenizer)
        return cls(model=model, spec=None, name=path.name, processor=processor, tokenizer=tokenizer)

    def draft_from(self, names: list[str]) -> NameDraft:
        """A draft of these names (e.g. the training products' names) for single images' greedy captions."""
        return NameDraft(self.token_ids(names), self.eos_token_id)

    @property
    def decodes_fast(self) -> bool:
        return self.fast_decoding and decoding.supports(self.model)

    @property
    def has_backbone(self) -> bool:
        """Ours: a frozen CNN backbone whose maps the encoder's tokens are made from."""
        return hasattr(self.model.encoder, "backbone_maps")

    @property
    def eos_token_id(self) -> int:
        eos = self.model.generation_config.eos_token_id
        return int(eos[0] if isinstance(eos, list) else eos)

    @property
    def text_tokenizer(self):
        return self.tokenizer if self.tokenizer is not None else gpt2_tokenizer()

    @property
    def start_token_id(self) -> int:
        start = self.model.generation_config.decoder_start_token_id
        return EOS_TOKEN_ID if start is None else int(start)

    def token_ids(self, texts: list[str], max_length: int = 48) -> list[list[int]]:
        """Each caption's token ids followed by the end token: what the decoder is scored on."""
        if self.tokenizer is None:
            return encode_captions(texts, max_length)
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [seq[: max_length - 1] + [self.eos_token_id] for seq in ids]

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        if self.spec is None:  # the model's own processor decides (most stretch to a square)
            return self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        return pixel_values(self.spec, [square(im, self.spec.image_size, self.spec.source_max_side) for im in images])

    def _encoder_parts(self, images: list[Image.Image]) -> Parts:
        """What the encoder makes of the images, through `encodings` when set: the frozen backbone's maps
        (mid, final) for ours, the encoder's tokens for any other."""
        def compute(todo: list[Image.Image]) -> Parts:
            pixels = self.preprocess(todo)
            if self.has_backbone:
                return self.model.encoder.backbone_maps(pixels)
            return (self.model.encoder(pixel_values=pixels).last_hidden_state,)

        return compute(images) if self.encodings is None else self.encodings.encode(images, compute)

    def embedding_key(self) -> str | None:
        """What `embed` depends on when it is the frozen backbone's alone (its weights, its precision on this
        machine, the preprocessing): equal for every run built on that backbone, so an evaluation of one can reuse
        another's catalog embeddings. None when the embedding is this model's own."""
        if not self.has_backbone or self.spec is None:
            return None
        weights = hashlib.sha256()
        for name, tensor in sorted(self.model.encoder.backbone.state_dict().items()):
            weights.update(name.encode())
            weights.update(tensor.detach().contiguous().numpy().tobytes())
        return digest("frozen backbone", weights.hexdigest(), self.backbone_arithmetic(), self.spec.encoder,
                      self.spec.image_size, self.spec.source_max_side, SHRINK_NAME,
                      image_processor(self.spec).to_dict())

    def backbone_arithmetic(self) -> str | None:
        """How the frozen backbone computes on this machine: "fp32", "bf16-native" or "bf16-emulated" (its float32
        emulation where bf16 is slow: a few captions differ from native bf16's). None without such a backbone."""
        if not self.has_backbone:
            return None
        precision = self.model.encoder.config.backbone_precision
        return precision if precision == "fp32" else precision + ("-native" if fast_bf16() else "-emulated")

    def _pooled(self, parts: Parts) -> torch.Tensor:
        """(B, D) image embedding: the backbone's final map averaged (an ImageNet CNN embedding), else the tokens'."""
        return parts[1].mean(dim=(2, 3)) if self.has_backbone else parts[0].mean(dim=1)

    @torch.no_grad()
    def encode(self, images: list[Image.Image] | Encoded) -> Encoded:
        """One encoder pass: what greedy, beams and candidate likelihoods of these images all start from."""
        if isinstance(images, Encoded):
            return images
        parts = self._encoder_parts(images)
        raw = self.model.encoder.tokens_from_maps(*parts) if self.has_backbone else parts[0]
        projection = getattr(self.model, "enc_to_dec_proj", None)
        hidden = projection(raw) if projection is not None and _has_projection(self.model) else raw
        return Encoded(raw=raw, hidden=hidden, pooled=self._pooled(parts), mid=parts[0] if self.has_backbone else None)

    @torch.no_grad()
    def run_batch(self, images: list[Image.Image], references: list[str] | None = None, num_beams: int = 1,
                  max_new_tokens: int = 32) -> CaptionBatch:
        encoded = self.encode(images)
        raw, hidden = encoded.raw, encoded.hidden
        out = CaptionBatch(captions=[], embeddings=torch.nn.functional.normalize(encoded.pooled, dim=1).numpy())
        if references is not None:
            loss, tokens = token_cross_entropy(self.model, hidden, _padded(self.token_ids(references)),
                                               self.start_token_id)
            out.loss_sum, out.tokens = loss.item() * tokens, tokens
        if num_beams > 1:
            out.captions = [beams[0] for beams in self.n_best(encoded, num_beams, max_new_tokens)]
        elif self.decodes_fast and self.draft is not None and len(hidden) == 1:
            prefix = (self.first_word_tokens(images, encoded) or [None])[0]
            out.captions = self._texts([decoding.drafted_greedy(self.model.decoder, hidden, self.start_token_id,
                                                                self.eos_token_id, max_new_tokens, self.draft,
                                                                prefix=prefix)])
        elif self.decodes_fast:
            out.captions = self._texts(decoding.greedy(self.model.decoder, hidden, self.start_token_id,
                                                       self.eos_token_id, max_new_tokens,
                                                       self.first_word_tokens(images, encoded)))
        else:
            out.captions = self._texts(self._generate(raw, 1, 1, max_new_tokens))
        return out

    def first_word_tokens(self, images: list[Image.Image], encoded: Encoded) -> list[list[int]] | None:
        """Each image's forced first word (token ids) with a brand step, else None: of the step's likeliest words
        (from the photo and its mirror image, the reranker's other view), the one with the highest sum of the
        step's and the decoder's log-probabilities."""
        if self.brand_step is None or encoded.mid is None:
            return None
        mirrored = self._encoder_parts([ImageOps.mirror(im) for im in images])[0]
        step_log_probs, indices = self.brand_step.likeliest(encoded.mid, mirrored)
        images, k = indices.shape
        words = [self.brand_step.words[i] for i in indices.reshape(-1).tolist()]
        for word in set(words) - self._word_tokens.keys():
            self._word_tokens[word] = self.token_ids([word])[0][:-1]
        candidates = [self._word_tokens[word] for word in words]
        decoder_log_probs = decoding.prefix_log_probs(self.model.decoder, encoded.hidden, self.start_token_id,
                                                      candidates, group=k)
        best = (step_log_probs + decoder_log_probs.view(images, k)).argmax(dim=1).tolist()
        return [candidates[image * k + choice] for image, choice in enumerate(best)]

    def _generate(self, raw: torch.Tensor, num_beams: int, num_return_sequences: int,
                  max_new_tokens: int) -> torch.Tensor:
        # the encoder ran once; generate() projects `raw` itself. The mask only says "every image token is real":
        # pad == eos, so generate() cannot infer it and warns otherwise (same tokens either way).
        return self.model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=raw),
                                   attention_mask=torch.ones(raw.shape[:2], dtype=torch.long),
                                   num_beams=num_beams, num_return_sequences=num_return_sequences,
                                   max_new_tokens=max_new_tokens)

    def _texts(self, token_ids) -> list[str]:
        return [c.strip() for c in self.text_tokenizer.batch_decode(token_ids, skip_special_tokens=True)]

    @torch.no_grad()
    def log_likelihoods(self, images: list[Image.Image] | Encoded, candidates: list[list[str]]) -> list[np.ndarray]:
        """The model's summed log-probability of each image's candidate captions (one array per image)."""
        hidden = self.encode(images).hidden
        if self.decodes_fast and self.tree_scoring:
            return self._tree_log_likelihoods(hidden, candidates)
        rows = [i for i, texts in enumerate(candidates) for _ in texts]
        flat = [text for texts in candidates for text in texts]
        if not flat:
            return [np.zeros(0) for _ in candidates]
        # shortest first, in chunks padded to their own longest: names run 5-25 tokens, so one padded batch would
        # spend about half of the decoder's work on padding
        tokens = self.token_ids(flat)
        order = np.argsort([len(seq) for seq in tokens], kind="stable")
        scores = np.zeros(len(flat))
        for start in range(0, len(order), LIKELIHOOD_CHUNK):
            chunk = order[start:start + LIKELIHOOD_CHUNK]
            labels = _padded([tokens[i] for i in chunk])
            images_used, image_of = torch.unique(torch.tensor([rows[i] for i in chunk]), return_inverse=True)
            scores[chunk] = sequence_log_likelihoods(self.model, hidden[images_used], labels, image_of,
                                                     self.start_token_id).numpy()
        bounds = np.cumsum([0] + [len(texts) for texts in candidates])
        return [scores[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def _tree_log_likelihoods(self, hidden: torch.Tensor, candidates: list[list[str]]) -> list[np.ndarray]:
        """`log_likelihoods` over each image's prefix tree (`ris_core.prefix_tree`), images in chunks."""
        scores = [np.zeros(len(texts)) for texts in candidates]
        scored = [i for i, texts in enumerate(candidates) if texts]
        for start in range(0, len(scored), TREE_CHUNK):
            chunk = scored[start:start + TREE_CHUNK]
            trees = [PrefixTree.of(self.token_ids(candidates[i]), self.start_token_id) for i in chunk]
            for i, sums in zip(chunk, tree_log_likelihoods(self.model.decoder, hidden[chunk], trees)):
                scores[i] = sums.numpy().astype(np.float64)
        return scores

    @torch.no_grad()
    def n_best(self, images: list[Image.Image] | Encoded, num_beams: int = 5,
               max_new_tokens: int = 32) -> list[list[str]]:
        """Each image's beam-search hypotheses, likeliest first (candidates for reranking)."""
        encoded = self.encode(images)
        if self.decodes_fast:
            found = decoding.beam_search(self.model.decoder, encoded.hidden, num_beams, self.start_token_id,
                                         self.eos_token_id, max_new_tokens)
            return [self._texts(beams) for beams in found]
        texts = self._texts(self._generate(encoded.raw, num_beams, num_beams, max_new_tokens))
        return [texts[i * num_beams : (i + 1) * num_beams] for i in range(encoded.raw.shape[0])]

    @torch.no_grad()
    def embed(self, images: list[Image.Image]) -> np.ndarray:
        """L2-normalised pooled encoder features (no decoding): the image-kNN embedding."""
        return torch.nn.functional.normalize(self._pooled(self._encoder_parts(images)), dim=1).numpy()


def _saved_text_and_image_parts(model_dir: Path) -> tuple[Any, Any]:
    """The image processor and tokenizer saved beside a captioner from elsewhere; CheckpointError if missing."""
    parts = {}
    for what, loader, hint in (("image processor", AutoImageProcessor, "preprocessor_config.json"),
                               ("tokenizer", AutoTokenizer, "tokenizer.json or vocab files")):
        try:
            parts[what] = loader.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(
                f"{model_dir} has no usable {what} ({hint}; {type(err).__name__}): save it beside the model with "
                f"{'processor' if what == 'image processor' else 'tokenizer'}.save_pretrained(folder)") from err
    return parts["image processor"], parts["tokenizer"]


def _fill_generation_ids(model: torch.nn.Module, tokenizer: Any) -> None:
    """Decoding needs a start, an end and a pad token; a checkpoint that names none gets the tokenizer's."""
    generation, config = model.generation_config, model.config
    eos = _first(generation.eos_token_id, config.eos_token_id, config.decoder.eos_token_id, tokenizer.eos_token_id)
    if eos is None:
        raise CheckpointError("the captioner names no end-of-caption token and its tokenizer has none: set "
                              "model.config.eos_token_id before saving")
    wanted = {"eos_token_id": eos,
              "decoder_start_token_id": _first(generation.decoder_start_token_id, config.decoder_start_token_id,
                                               config.decoder.bos_token_id, tokenizer.bos_token_id, eos),
              "pad_token_id": _first(generation.pad_token_id, config.pad_token_id, tokenizer.pad_token_id, eos)}
    filled = {name: value for name, value in wanted.items() if getattr(generation, name) is None}
    if filled:
        logger.info("decoding with %s (not set in the checkpoint's generation config)", filled)
    for name, value in filled.items():
        setattr(generation, name, value)
        setattr(config, name, value)


def _first(*values):
    return next((v for v in values if v is not None), None)


def _padded(labels: list[list[int]]) -> torch.Tensor:
    tensor = torch.full((len(labels), max(map(len, labels))), -100, dtype=torch.long)
    for row, seq in enumerate(labels):
        tensor[row, : len(seq)] = torch.tensor(seq)
    return tensor


def _has_projection(model) -> bool:
    return model.encoder.config.hidden_size != model.decoder.config.hidden_size
