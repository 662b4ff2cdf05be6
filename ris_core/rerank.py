"""Reranked captions: per image, the best of the model's own hypotheses and the names of its visually nearest
training products (retrieval-augmented decoding), scored beside greedy, never instead of it.

score(c) = log p(c | image) [+ log p(c | mirror image)] + visual_weight * similarity(c) + length_weight * words(c)

similarity(c) is the cosine similarity of the image to the nearest training image named c; a caption the model
generated itself counts as slightly less similar than the farthest neighbour in the pool (`generated_margin`).
The defaults were tuned on 500 held-out products of the reference run: `python -m training.tune_rerank`.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageOps


@dataclass(frozen=True)
class RerankConfig:
    k: int = 10  # names of the k visually nearest training products join the pool
    num_beams: int = 5  # ... and the model's beam-search n-best (0 = greedy caption only)
    mirror: bool = True  # add the likelihood under the mirror image (the cpu preset trains with flips)
    visual_weight: float = 60.0  # nats per unit of cosine similarity
    length_weight: float = 0.5  # nats per word: likelihood alone prefers short captions, BLEU penalises them
    generated_margin: float = 0.02


@dataclass(frozen=True)
class Candidate:
    text: str
    log_likelihood: float  # summed over tokens, and over both views when mirrored
    similarity: float
    generated: bool  # the model's own caption (greedy or beam), not a neighbour's name
    score: float


def candidate_pool(generated: list[str], neighbours: list[tuple[str, float]],
                   margin: float) -> dict[str, tuple[float, bool]]:
    """{text: (similarity, generated)} over the model's captions and the neighbours' (name, similarity)."""
    pool: dict[str, tuple[float, bool]] = {}
    for name, similarity in neighbours:  # nearest first: a repeated name keeps its best similarity
        pool.setdefault(name.strip(), (float(similarity), False))
    floor = min((s for _, s in neighbours), default=0.0) - margin
    for text in generated:
        pool.setdefault(text.strip(), (floor, True))
    pool.pop("", None)
    return pool


def score(log_likelihood: float, similarity: float, text: str, config: RerankConfig) -> float:
    return log_likelihood + config.visual_weight * similarity + config.length_weight * len(text.split())


def rerank(captioner, images: list[Image.Image], greedy: list[str], neighbours: list[list[tuple[str, float]]],
           config: RerankConfig = RerankConfig()) -> list[list[Candidate]]:
    """Per image, its candidates best first (an empty list if it has none)."""
    # one encoder pass per view, shared by the beams and the likelihoods, where the captioner can hand it over
    encode = getattr(captioner, "encode", lambda views: views)
    direct = encode(images)
    hypotheses = captioner.n_best(direct, config.num_beams) if config.num_beams > 1 else [[] for _ in images]
    pools = [candidate_pool([g, *h], n, config.generated_margin)
             for g, h, n in zip(greedy, hypotheses, neighbours, strict=True)]
    texts = [list(pool) for pool in pools]
    likelihoods = captioner.log_likelihoods(direct, texts)
    if config.mirror:
        mirrored = captioner.log_likelihoods(encode([ImageOps.mirror(im) for im in images]), texts)
        likelihoods = [a + b for a, b in zip(likelihoods, mirrored)]
    ranked = []
    for pool, names, scores in zip(pools, texts, likelihoods):
        candidates = [Candidate(text=t, log_likelihood=float(ll), similarity=pool[t][0], generated=pool[t][1],
                                score=score(float(ll), pool[t][0], t, config))
                      for t, ll in zip(names, scores)]
        ranked.append(sorted(candidates, key=lambda c: -c.score))
    return ranked


def describe(settings: dict) -> str:
    """One phrase for the reranking recorded in caption_metrics.json (evaluations before beams/weights too)."""
    k = settings.get("k", "?")
    if "num_beams" not in settings:  # the first version: likelihood only, greedy caption + k names
        return (f"the model's most likely of its greedy caption and the names of the {k} visually nearest "
                "training products")
    beams = f", its {settings['num_beams']} beam hypotheses" if settings["num_beams"] > 1 else ""
    views = " on the image and its mirror" if settings.get("mirror") else ""
    return (f"the best of the greedy caption{beams} and the names of the {k} visually nearest training products, "
            f"scored by the model's log-likelihood{views} + {settings['visual_weight']:g} x visual similarity "
            f"+ {settings['length_weight']:g} per word")
