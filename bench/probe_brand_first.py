"""Would a brand step make captions of unseen products better? Captions decoded after a brand classifier's word.

    python -m bench.probe_brand_head --run results/runs/grouped-cpu --heads "the stride-32 stage tuned, linear" \\
        --mirrored --epochs 16 --predictions /tmp/brand                        # ~30 min: the classifier
    python -m bench.probe_brand_first --run results/runs/grouped-cpu \\
        --predictions /tmp/brand/the-stride-32-stage-tuned-linear.csv          # ~4 min: decoding and scores

The first word of a name (mostly the brand) decides most of a novel caption's CIDEr-D (bench/probe_novel_words.py),
and the backbone's top stage, tuned as a brand classifier, names it more often than the captioner does
(bench/probe_brand_head.py). Here that word, written as most training names write it, is forced as the caption's
beginning and the captioner decodes the rest greedily, on every held-out product:

- greedy: nothing forced (the same decoding; its captions are compared with the evaluation's captions.csv);
- the head's word: the classifier's likeliest first word;
- the head's and the captioner's: of the classifier's five likeliest words, the one with the highest sum of both
  models' log-probabilities (the captioner's of the word's tokens; no weight is tuned);
- the reference's word (an oracle): what a perfect brand step would give, decoded rather than substituted.

Scored like the evaluation, for all held-out products and for the seen and novel ones (captions.csv's `seen`):
CIDEr-D with the document frequencies of all the products scored, sacrebleu BLEU-4.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ris_core import decoding
from ris_core.brand_step import written_forms
from ris_core.data import load_catalog
from ris_core.encoder_decoder import Captioner
from ris_core.evaluation import files
from ris_core.evaluation.pipeline import resolve_data_dir
from ris_core.files import write_csv_atomic
from ris_core.images import open_image
from ris_core.metrics import cider_d, corpus_bleu_4, first_word_rate, last_words_match
from ris_core.runs import Run


def decode_all(captioner: Captioner, hidden: torch.Tensor, prefixes: list[str], generate: bool = True,
               batch_size: int = 64, max_new_tokens: int = 32, desc: str = "decoding") -> tuple[list[str], np.ndarray]:
    """Each image's greedy caption after its own forced text (`ris_core.decoding.greedy`'s prefixes), or with
    `generate=False` that text's log-probability under the decoder instead (`decoding.prefix_log_probs`)."""
    tokens_of = {text: (captioner.token_ids([text])[0][:-1] if text else []) for text in set(prefixes)}
    decoder, start = captioner.model.decoder, captioner.start_token_id
    texts, log_probs = [""] * len(prefixes), np.zeros(len(prefixes))
    for s in tqdm(range(0, len(prefixes), batch_size), desc=desc, unit="batch", mininterval=2):
        rows = list(range(s, min(s + batch_size, len(prefixes))))
        forced = [tokens_of[prefixes[row]] for row in rows]
        if generate:
            ids = decoding.greedy(decoder, hidden[rows], start, captioner.eos_token_id, max_new_tokens, forced)
            for row, caption in zip(rows, captioner.text_tokenizer.batch_decode(ids, skip_special_tokens=True)):
                texts[row] = caption.strip()
        else:
            log_probs[rows] = decoding.prefix_log_probs(decoder, hidden[rows], start, forced).numpy()
    return texts, log_probs


def scores(texts: list[str], references: list[str], subsets: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per subset (a boolean mask over the products); CIDEr-D's document frequencies from all of them."""
    cider = np.array(cider_d(texts, references)[1])
    rows = {}
    for subset, keep in subsets.items():
        kept_texts = [t for t, k in zip(texts, keep) if k]
        kept_references = [r for r, k in zip(references, keep) if k]
        rows[subset] = {"products": int(keep.sum()), "first_word_right": first_word_rate(kept_texts, kept_references),
                        "bleu_4": corpus_bleu_4(kept_texts, kept_references), "cider_d": float(cider[keep].mean()),
                        "last_two_match": float(np.mean([last_words_match(t, r)
                                                         for t, r in zip(kept_texts, kept_references)]))}
    return pd.DataFrame(rows).T


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data_dir", type=Path, default=None)
    parser.add_argument("--predictions", type=Path, required=True,
                        help="bench/probe_brand_head.py's CSV: id, word_1..word_5, p_1..p_5 per held-out product")
    parser.add_argument("--out", type=Path, default=None, help="also write every caption here (CSV)")
    args = parser.parse_args(argv)
    run = Run(args.run)
    catalog = load_catalog(resolve_data_dir(run, args.data_dir))
    products = catalog.products
    if not args.predictions.is_file():
        raise SystemExit(f"error: {args.predictions} does not exist: bench.probe_brand_head --predictions writes it")
    predicted = pd.read_csv(args.predictions, keep_default_na=False)
    ids = predicted["id"].tolist()
    if unknown := [i for i in ids if i not in products.index]:
        raise SystemExit(f"error: {len(unknown)} product ids of {args.predictions} are not in "
                         f"{catalog.image_dir.parent} (e.g. {unknown[0]}): predictions of another dataset?")
    references = products.loc[ids, "productDisplayName"].tolist()
    forms = written_forms(products.loc[run.split().train_ids, "productDisplayName"].tolist())
    captioner = Captioner.load(run.path)
    hidden = torch.cat([captioner.encode([open_image(catalog.image_path(i)) for i in ids[s : s + 64]]).hidden
                        for s in tqdm(range(0, len(ids), 64), desc="encoding", unit="batch", mininterval=2)])
    captions = pd.DataFrame({"id": ids, "reference": references})
    captions["greedy"], _ = decode_all(captioner, hidden, [""] * len(ids), desc="greedy")
    captions["head"], _ = decode_all(captioner, hidden, [forms[w] for w in predicted["word_1"]], desc="the head's")
    top = [c for c in predicted if c.startswith("word_")]
    joint = np.stack([decode_all(captioner, hidden, [forms[w] for w in predicted[c]], generate=False,
                                 desc=f"likelihood of {c}")[1] + np.log(np.maximum(predicted[f"p_{c[5:]}"], 1e-9))
                      for c in top], axis=1)
    chosen = [predicted.loc[row, top[k]] for row, k in enumerate(joint.argmax(1))]
    captions["head_and_captioner"], _ = decode_all(captioner, hidden, [forms[w] for w in chosen], desc="joint")
    captions["oracle"], _ = decode_all(captioner, hidden, [r.split()[0] if r.split() else "" for r in references],
                                       desc="oracle")
    evaluated = pd.read_csv(run.eval_dir / files.CAPTIONS, keep_default_na=False).set_index("id")
    same = float(np.mean([evaluated.loc[i, "generated"] == g for i, g in zip(ids, captions["greedy"])]))
    print(f"{run.name}: {len(ids)} held-out products; greedy captions identical to the evaluation's: {same:.4f}")
    seen = (evaluated.loc[ids, "seen"].astype(str).str.lower().eq("true").to_numpy() if "seen" in evaluated
            else np.zeros(len(ids), dtype=bool))  # an evaluation older than the seen / novel breakdown
    subsets = {"all": np.ones(len(ids), dtype=bool), **({"seen": seen, "novel": ~seen} if seen.any() else {})}
    table = pd.concat({column: scores(captions[column].tolist(), references, subsets)
                       for column in ("greedy", "head", "head_and_captioner", "oracle")}, names=["decoding", "subset"])
    table["products"] = table["products"].astype(int)
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    if args.out is not None:
        write_csv_atomic(args.out, captions)
    return table


if __name__ == "__main__":
    main()
