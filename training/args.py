"""Command-line arguments (dataclasses for HfArgumentParser) and the presets that fill them.

A field left at None takes its value from the preset; anything passed on the command line wins.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from transformers import HfArgumentParser

from ris_core.data import DEFAULT_DATA_DIR, SPLIT_BY
from ris_core.modeling import ModelSpec
from ris_core.runs import RESULTS_DIR

PRESETS: dict[str, dict] = {
    # Runs here: a frozen ImageNet MobileNetV2 (from a PyPI wheel) whose maps are extracted once and cached,
    # so each epoch only trains the token head and a small GPT-2; ~6 min/epoch on 2 AVX-512 cores for 40k
    # products (10 epochs and the maps' extraction: 75 min; add --larger_images_dir where larger photos exist).
    "cpu": dict(
        encoder="mobilenet_v2", image_size=128,  # 128 px gives 8x8 and 4x4 maps from 60x80 sources
        multi_scale=True,  # 64 stride-16 tokens + 16 final ones for finer detail (logos, patterns)
        decoder="scratch", n_embd=256, n_head=4,
        n_layer=8,  # with jitter: val ppl 3.084 vs 4 layers' 3.165, novel CIDEr-D 1.72 vs 1.60 (results/cpu-preset.md)
        dropout=0.1,  # 0.25 narrowed the train/val gap but val perplexity trailed (results/cpu-preset.md)
        source_max_side=80,  # the small dataset's resolution; larger inputs are shrunk to it
        epochs=10,  # a 16-epoch schedule overfit (best val ppl 3.351 vs 3.217; results/cpu-preset.md)
        flip_p=0.5,  # left-right flips (maps of mirrored images, cached once): val ppl 3.184 vs 3.217
        jitter_views=2,  # two cached crop/rescale views: captions stop depending on the photo's size
        batch_size=64, learning_rate=5e-4, warmup_steps=200, lr_scheduler="cosine",
        weight_decay=0.1,  # AdamW decay 0.1 vs 0.01: val ppl 3.165 vs 3.184 (results/cpu-preset.md)
        precision="bf16",  # bf16 autocast + eager attention: 1.6x over fp32 SDPA on CPU
        cache_features=True, staged_unfreezing=False,
        output_shortlist=True,  # softmax over the ~7k tokens names use + one shared "other": 7x cheaper, exact
        # then a brand step fit on every training product: on the split by name novel CIDEr-D 2.616 against the
        # issue's starting 2.162, 2.246 without the step (results/cpu-preset.md, "The brand step in the preset")
        brand_step_epochs=12,
    ),
    # The paper: pretrained ViT-B/16 (in21k) + GPT-2 from the Hub, 224 px, needs a GPU to finish in hours.
    "paper": dict(
        encoder="google/vit-base-patch16-224-in21k", image_size=224, multi_scale=False,
        decoder="gpt2", n_layer=12, n_embd=768, n_head=12, n_positions=1024,
        source_max_side=None,
        epochs=5, batch_size=32, learning_rate=1e-4,
        warmup_steps=-0.3,  # negative = a fraction of all steps: one-cycle shape, peak 1e-4 at 30%
        lr_scheduler="cosine", weight_decay=0.01, precision="fp16",  # mixed precision on the GPU
        cache_features=False, staged_unfreezing=True,  # epoch 0 cross-attention, 1 + GPT-2, then all
        output_shortlist=False,  # keep pretrained GPT-2's full output layer
        flip_p=0.0,  # as in the paper
    ),
}


@dataclass
class ModelArguments:
    preset: str = field(default="cpu", metadata={"help": f"one of {sorted(PRESETS)}; other flags override it"})
    encoder: str | None = field(default=None, metadata={"help": "mobilenet_v2, vit_scratch, or a Hub ViT id"})
    image_size: int | None = field(default=None, metadata={"help": "encoder input size in pixels"})
    multi_scale: bool | None = field(default=None, metadata={"help": "mobilenet_v2: add the stride-16 map"})
    vit_patch: int | None = field(default=None, metadata={"help": "vit_scratch patch size"})
    vit_layers: int | None = field(default=None, metadata={"help": "vit_scratch depth"})
    vit_width: int | None = field(default=None, metadata={"help": "vit_scratch width"})
    decoder: str | None = field(default=None, metadata={"help": "'scratch' or a Hub GPT-2 id such as gpt2"})
    n_layer: int | None = field(default=None, metadata={"help": "decoder depth (scratch decoder)"})
    n_embd: int | None = field(default=None, metadata={"help": "decoder width (scratch decoder)"})
    n_head: int | None = field(default=None, metadata={"help": "decoder heads (scratch decoder)"})
    n_positions: int | None = field(default=None, metadata={"help": "decoder context length"})
    dropout: float | None = field(default=None, metadata={"help": "decoder dropout"})
    source_max_side: int | None = field(
        default=None, metadata={"help": "shrink images to this longest side before the encoder (0 = never)"}
    )


@dataclass
class DataArguments:
    data_dir: str = field(default=str(DEFAULT_DATA_DIR), metadata={
        "help": "Kaggle layout (styles.csv + images/), or any copy `datasets` reads: a parquet file or folder, a saved "
                "Arrow dataset, an imagefolder, a Hub dataset id"})
    image_column: str | None = field(default=None, metadata={"help": "non-Kaggle sources: the image column"})
    text_column: str | None = field(default=None, metadata={
        "help": "non-Kaggle sources: the caption column (default: productDisplayName, text, caption, title, name)"})
    id_column: str | None = field(default=None, metadata={
        "help": "non-Kaggle sources: the numeric product id (default: id; an imagefolder's file stem)"})
    rename_column: list[str] | None = field(default=None, metadata={
        "help": "non-Kaggle sources: source=kaggle pairs for attribute columns, e.g. category=articleType"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of product ids held out"})
    split_seed: int = field(default=0, metadata={"help": "changes which products are held out"})
    split_by: str = field(default="product", metadata={
        "help": "product: a random split of products (the paper's); name: products sharing a productDisplayName "
                "never straddle train and validation, so held-out names are novel (measures generalisation)"})
    max_products: int | None = field(default=None, metadata={"help": "use only the first N products (smoke tests)"})
    max_caption_tokens: int = field(default=48, metadata={"help": "GPT-2 tokens per caption, EOS included"})
    cache_dir: str = field(default=".cache", metadata={"help": "where decoded images and encoder maps are cached"})
    flip_p: float | None = field(
        default=None, metadata={"help": "chance of mirroring a training image left-right (cached: its mirrored maps)"}
    )
    larger_images_dir: str | None = field(default=None, metadata={
        "help": "a Kaggle-layout folder with larger photos of some of the same products (e.g. "
                "../shared/data/fashion-product-images): training products found there are shown from that photo "
                "instead, with chance --larger_images_p, so the captioner stops depending on the input's size"})
    larger_images_p: float = field(default=0.5, metadata={
        "help": "chance of showing a training product's larger photo, when --larger_images_dir has one"})
    jitter_views: int | None = field(default=None, metadata={
        "help": "seeded random crops, rescalings and mirrorings of every training image to extract and cache "
                "(each view costs one more map extraction); a training row is shown from one with --jitter_p "
                "(default: the preset's where maps are cached, else 0)"})
    jitter_p: float = field(default=0.4, metadata={"help": "chance of showing a jittered view, with --jitter_views"})


@dataclass
class RunArguments:
    run_name: str | None = field(
        default=None, metadata={"help": "folder under --results_dir (default: built from the settings)"}
    )
    results_dir: str = field(default=str(RESULTS_DIR / "runs"), metadata={"help": "where run folders live"})
    epochs: int | None = field(default=None, metadata={"help": "training epochs"})
    max_steps: int = field(default=-1, metadata={"help": "stop after N optimizer steps (tests); -1 = all epochs"})
    batch_size: int | None = field(default=None, metadata={"help": "per-device batch size"})
    learning_rate: float | None = field(default=None, metadata={"help": "peak learning rate"})
    warmup_steps: float | None = field(default=None, metadata={"help": "steps, or a negative fraction of all steps"})
    lr_scheduler: str | None = field(default=None, metadata={"help": "transformers scheduler (cosine, linear, ...)"})
    weight_decay: float | None = field(default=None, metadata={"help": "AdamW weight decay"})
    precision: str | None = field(default=None, metadata={"help": "fp32, bf16 or fp16 (fp16 needs a GPU)"})
    cache_features: bool | None = field(default=None, metadata={"help": "extract frozen encoder maps once"})
    staged_unfreezing: bool | None = field(default=None, metadata={"help": "paper: cross-attn, then GPT-2, then all"})
    output_shortlist: bool | None = field(
        default=None, metadata={"help": "train the output layer on caption tokens + one shared 'other' vector"}
    )
    group_by_length: bool = field(default=False, metadata={
        "help": "batches of captions of similar length, in random order (training.data.LengthBucketedSampler): "
                "in random batches of 64, 46%% of the decoder's token positions are padding "
                "(python -m bench.probe_length_grouping)"})
    brand_step_epochs: int | None = field(default=None, metadata={
        "help": "after the captioner, fit a brand step on every training product for N epochs "
                "(training.train_brand_step --fit_all, on the cached maps; ~13 min for 40k products); 0: none"})
    seed: int = field(default=0, metadata={"help": "initialisation and shuffling seed"})
    eval_batch_size: int = field(default=256, metadata={"help": "batch size of the per-epoch validation pass"})
    report_to: str = field(default="none", metadata={
        "help": "none, or tensorboard: Trainer's own integration, event files in <run>/tensorboard/ (per-step train "
                "loss, and per epoch the rows of history.csv)"})


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, RunArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, RunArguments))
    model_args, data_args, run_args = parser.parse_args_into_dataclasses(args=argv)
    if model_args.preset not in PRESETS:
        raise SystemExit(f"error: unknown --preset {model_args.preset!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[model_args.preset]
    jitter_asked = data_args.jitter_views is not None
    step_asked = run_args.brand_step_epochs is not None
    for obj in (model_args, data_args, run_args):
        for f in fields(obj):
            if getattr(obj, f.name) is None and f.name in preset:
                setattr(obj, f.name, preset[f.name])
    if data_args.jitter_views is None or not (jitter_asked or run_args.cache_features):
        data_args.jitter_views = 0  # the preset's views need cached maps; only an explicit ask is refused below
    if run_args.brand_step_epochs is None or not (step_asked or run_args.cache_features):
        run_args.brand_step_epochs = 0  # the preset's step reads cached maps; only an explicit ask is refused below
    if model_args.source_max_side == 0:
        model_args.source_max_side = None
    if run_args.precision not in ("fp32", "bf16", "fp16"):
        raise SystemExit(f"error: --precision must be fp32, bf16 or fp16, not {run_args.precision!r}")
    if data_args.split_by not in SPLIT_BY:
        raise SystemExit(f"error: --split_by must be one of {', '.join(SPLIT_BY)}, not {data_args.split_by!r}")
    if not 0.0 <= data_args.larger_images_p <= 1.0:
        raise SystemExit(f"error: --larger_images_p must be in [0, 1], not {data_args.larger_images_p}")
    if not 0.0 <= data_args.jitter_p <= 1.0:
        raise SystemExit(f"error: --jitter_p must be in [0, 1], not {data_args.jitter_p}")
    if data_args.jitter_views < 0:
        raise SystemExit(f"error: --jitter_views must be 0 or more, not {data_args.jitter_views}")
    if data_args.jitter_views and not run_args.cache_features:
        raise SystemExit("error: --jitter_views works on cached encoder maps; drop --cache_features false")
    if data_args.larger_images_dir and not run_args.cache_features:
        raise SystemExit("error: --larger_images_dir works on cached encoder maps; drop --cache_features false")
    if run_args.brand_step_epochs < 0:
        raise SystemExit(f"error: --brand_step_epochs must be 0 or more, not {run_args.brand_step_epochs}")
    if run_args.brand_step_epochs and not run_args.cache_features:
        raise SystemExit("error: --brand_step_epochs works on cached encoder maps; drop --cache_features false")
    if run_args.cache_features and model_args.encoder != "mobilenet_v2":
        raise SystemExit("error: --cache_features needs the frozen mobilenet_v2 encoder; pass --cache_features false")
    return model_args, data_args, run_args


def model_spec(model_args: ModelArguments) -> ModelSpec:
    known = {f.name for f in fields(ModelSpec)}
    values = {k: v for k, v in asdict(model_args).items() if k in known and v is not None}
    return ModelSpec(**values)


def default_run_name(model_args: ModelArguments, run_args: RunArguments) -> str:
    return (f"{model_args.preset}-{model_args.encoder.split('/')[-1]}{model_args.image_size}"
            f"-dec{model_args.n_layer}x{model_args.n_embd}-ep{run_args.epochs}-seed{run_args.seed}")
