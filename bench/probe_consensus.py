"""Would a consensus pick among the reranker's candidates describe novel products better? Minimum Bayes risk.

    python -m bench.probe_consensus --run <evaluated copy of a run>   # ~7 min; --k 20 --num_beams 10: larger pools

Per held-out product, the reranker's candidate pool (the greedy caption, 5 beam hypotheses, the names of the 10
visually nearest training products) with each candidate's rerank score (`ris_core/rerank.py`), computed once and
kept in `.cache/probes/`. Picks compared by corpus BLEU-4 and by mean CIDEr-D with the evaluation's document
frequencies (so the figures are those of `caption_metrics.json`), for seen and novel products:
- greedy, and the reranker's pick (the evaluation's `reranked`);
- minimum Bayes risk (MBR): the candidate with the highest expected similarity to the others, each weighted by
  softmax(score / T); the similarity is smoothed sentence BLEU or CIDEr-D with document frequencies from the
  training names (never from the references);
- the oracle: each product's candidate with the best CIDEr-D against its reference (a bound, not a decoding).
T is chosen on the even product ids and reported on the odd ones.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from pycocoevalcap.cider.cider_scorer import CiderScorer, precook
from tqdm.auto import tqdm

from bench.common import REPO
from ris_core.captioner import load_any_captioner
from ris_core.data import Split, load_catalog
from ris_core.errors import ImageError
from ris_core.evaluation import files
from ris_core.evaluation.pipeline import resolve_data_dir
from ris_core.files import digest, file_sha256, write_json_atomic
from ris_core.images import open_image
from ris_core.metrics import cider_d, coco_tokens, corpus_bleu_4, sentence_bleu
from ris_core.rerank import RerankConfig, rerank
from ris_core.runs import Run
from ris_core.search.image_knn import ImageKnnIndex

TEMPERATURES = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, float("inf"))  # nats; inf = every candidate alike
CACHE = REPO / ".cache" / "probes"


def candidate_pools(run: Run, captions: pd.DataFrame, data_dir: Path, config: RerankConfig = RerankConfig(),
                    batch_size: int = 16) -> list[list[dict]]:
    """Per held-out product, its candidates best first: text, score, log_likelihood, similarity, generated."""
    key = digest("consensus-pools", (run.model_dir / "model.safetensors").stat().st_mtime_ns, str(data_dir.resolve()),
                 file_sha256(run.eval_dir / files.VAL_EMBEDDINGS), captions[["id", "generated"]].values.tolist(),
                 sorted(vars(config).items()))
    path = CACHE / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    captioner = load_any_captioner(run.path)
    catalog = load_catalog(data_dir)
    index = ImageKnnIndex.load(run.eval_dir / files.CATALOG_KNN)
    vectors = np.load(run.eval_dir / files.VAL_EMBEDDINGS, allow_pickle=False)
    nearest = index.search_vectors(vectors, k=config.k)
    pools: list[list[dict]] = []
    for start in tqdm(range(0, len(captions), batch_size), desc="candidate pools", unit="batch", mininterval=5):
        rows = range(start, min(start + batch_size, len(captions)))
        images, kept = [], []
        for row in rows:
            try:
                images.append(open_image(catalog.image_path(int(captions["id"].iloc[row]))))
                kept.append(row)
            except ImageError:
                continue
        ranked = rerank(captioner, images, [captions["generated"].iloc[r] for r in kept],
                        [[(hit.title, hit.score) for hit in nearest[r].results] for r in kept], config)
        found = dict(zip(kept, ranked))
        pools += [[vars(c) for c in found.get(row, [])] for row in rows]
    CACHE.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, pools)
    return pools


def slot_cider(pools: list[list[dict]], references: list[str]) -> list[list[float]]:
    """CIDEr-D of every candidate against its product's reference, with the document frequencies of all
    references (one call per pool slot, so every call sees the same references)."""
    scores = [[0.0] * len(pool) for pool in pools]
    for slot in range(max(map(len, pools))):
        texts = [pool[slot]["text"] if slot < len(pool) else "" for pool in pools]
        per = cider_d(texts, references)[1]
        for i, pool in enumerate(pools):
            if slot < len(pool):
                scores[i][slot] = per[i]
    return scores


class TrainingCider:
    """CIDEr-D between two captions (pycocoevalcap's formula: tf-idf n-grams, n = 1..4, clipped, sigma 6, x10)
    with document frequencies from the training names, never from the references: a similarity for MBR."""

    def __init__(self, names: list[str], n: int = 4, sigma: float = 6.0) -> None:
        scorer = CiderScorer(n=n, sigma=sigma)
        for name in names:
            scorer += (None, [coco_tokens(name)])
        scorer.compute_doc_freq()
        self.frequencies, self.log_documents = scorer.document_frequency, float(np.log(len(names)))
        self.n, self.sigma = n, sigma

    def _vector(self, text: str) -> tuple[list[dict], np.ndarray, int]:
        """tf-idf weights per n-gram order, their norms, and the length the library's penalty uses (bigrams)."""
        vec: list[dict] = [{} for _ in range(self.n)]
        grams = precook(coco_tokens(text), self.n)
        for gram, count in grams.items():
            idf = self.log_documents - np.log(max(1.0, self.frequencies.get(gram, 0.0)))
            vec[len(gram) - 1][gram] = count * idf
        norms = np.array([np.sqrt(sum(v * v for v in part.values())) for part in vec])
        return vec, norms, sum(vec_count for gram, vec_count in grams.items() if len(gram) == 2)

    def matrix(self, texts: list[str]) -> np.ndarray:
        """sim[i, j] = CIDEr-D of texts[i] against texts[j] as its reference."""
        vectors = [self._vector(t) for t in texts]
        sim = np.zeros((len(texts), len(texts)))
        for i, (hyp, hyp_norms, hyp_len) in enumerate(vectors):
            for j, (ref, ref_norms, ref_len) in enumerate(vectors):
                per_n = [sum(min(w, ref[g].get(gram, 0.0)) * ref[g].get(gram, 0.0) for gram, w in h.items())
                         / (hyp_norms[g] * ref_norms[g]) if hyp_norms[g] and ref_norms[g] else 0.0
                         for g, h in enumerate(hyp)]
                sim[i, j] = 10 * np.mean(per_n) * np.exp(-((hyp_len - ref_len) ** 2) / (2 * self.sigma ** 2))
        return sim


def bleu_matrix(texts: list[str]) -> np.ndarray:
    return np.array([[sentence_bleu(h, r) for r in texts] for h in texts], dtype=float)


def mbr_picks(pools: list[list[dict]], similarity: list[np.ndarray], temperature: float) -> list[int]:
    picks = []
    for pool, sim in zip(pools, similarity):
        if not pool:
            picks.append(-1)
            continue
        scores = np.array([c["score"] for c in pool])
        weights = (np.ones_like(scores) if np.isinf(temperature)
                   else np.exp((scores - scores.max()) / temperature))
        picks.append(int(np.argmax(sim @ (weights / weights.sum()))))
    return picks


def figures(texts: list[str], cider: np.ndarray, captions: pd.DataFrame, keep: np.ndarray) -> dict:
    refs = captions.loc[keep, "reference"].tolist()
    chosen = [t for t, k in zip(texts, keep) if k]
    return {"n": int(keep.sum()), "bleu_4": round(corpus_bleu_4(chosen, refs), 2),
            "cider_d": round(float(cider[keep].mean()), 3)}


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data_dir", type=Path, default=None)
    parser.add_argument("--k", type=int, default=RerankConfig.k, help="visually nearest training names in a pool")
    parser.add_argument("--num_beams", type=int, default=RerankConfig.num_beams, help="beam hypotheses in a pool")
    parser.add_argument("--out", type=Path, default=None, help="also write the table as CSV here")
    args = parser.parse_args(argv)
    run = Run(args.run)
    needed = [run.eval_dir / name for name in (files.CAPTIONS, files.VAL_EMBEDDINGS, files.CATALOG_KNN + ".npz")]
    if missing := [path.name for path in needed if not path.is_file()]:
        raise SystemExit(f"error: {run.eval_dir} has no {', '.join(missing)}: the repository ships evaluations "
                         "without them; evaluate a copy of the run first (python -m training.evaluate --run <copy>)")
    data_dir = resolve_data_dir(run, args.data_dir)
    captions = pd.read_csv(run.eval_dir / files.CAPTIONS, keep_default_na=False)
    captions["seen"] = captions["seen"].astype(str).str.lower().eq("true")
    pools = candidate_pools(run, captions, data_dir, RerankConfig(k=args.k, num_beams=args.num_beams))
    references = captions["reference"].tolist()
    cider = slot_cider(pools, references)
    products = load_catalog(data_dir, require_images=False).products
    train_names = products.loc[[i for i in Split.load(run.path / "split.json").train_ids if i in products.index],
                               "productDisplayName"].astype(str).tolist()
    training_cider = TrainingCider(train_names)
    similarities = {"sentence BLEU": [], "training-df CIDEr-D": []}
    for pool in tqdm(pools, desc="pairwise similarities", mininterval=5):
        texts = [c["text"] for c in pool]
        similarities["sentence BLEU"].append(bleu_matrix(texts))
        similarities["training-df CIDEr-D"].append(training_cider.matrix(texts) if texts else np.zeros((0, 0)))

    def picked(picks: list[int], fallback: pd.Series) -> tuple[list[str], np.ndarray]:
        texts = [pool[p]["text"] if p >= 0 else fallback.iloc[i] for i, (pool, p) in enumerate(zip(pools, picks))]
        return texts, np.array([cider[i][p] if p >= 0 else 0.0 for i, p in enumerate(picks)])

    greedy_cider = np.array(cider_d(captions["generated"].tolist(), references)[1])
    choices = {("greedy", ""): (captions["generated"].tolist(), greedy_cider),
               ("reranked", ""): picked([0 if pool else -1 for pool in pools], captions["generated"]),
               ("oracle", ""): picked([int(np.argmax(c)) if c else -1 for c in cider], captions["generated"])}
    for name, sims in similarities.items():
        for t in TEMPERATURES:
            choices[(f"MBR, {name}", f"{t:g}")] = picked(mbr_picks(pools, sims, t), captions["generated"])
    even = (captions["id"] % 2 == 0).to_numpy()
    seen = captions["seen"].to_numpy()
    rows = []
    for (pick, temperature), (texts, scores) in choices.items():
        row = {"pick": pick, "T": temperature}
        for part, in_part in (("tune", even), ("check", ~even)):
            for subset, in_subset in (("novel", ~seen), ("seen", seen), ("all", np.ones_like(seen))):
                if not (in_part & in_subset).any():  # a split by name has no seen products
                    continue
                got = figures(texts, scores, captions, in_part & in_subset)
                row |= {f"{part} {subset} BLEU-4": got["bleu_4"], f"{part} {subset} CIDEr-D": got["cider_d"]}
        rows.append(row)
    table = pd.DataFrame(rows)
    pd.set_option("display.width", 250)
    print(table[["pick", "T", *[c for c in table if c.startswith(("tune novel", "check"))]]].to_string(index=False))
    for name in similarities:
        options = table[table["pick"] == f"MBR, {name}"]
        best = options.sort_values("tune novel CIDEr-D").iloc[-1]
        reranked = table[table["pick"] == "reranked"].iloc[0]
        print(f"MBR, {name}: T={best['T']} best on the tune half's novel products; check half novel CIDEr-D "
              f"{best['check novel CIDEr-D']} (reranked {reranked['check novel CIDEr-D']}), BLEU-4 "
              f"{best['check novel BLEU-4']} ({reranked['check novel BLEU-4']})")
    if args.out:
        table.to_csv(args.out, index=False)
    return table


if __name__ == "__main__":
    main()
