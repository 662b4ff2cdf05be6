"""RIS BLEU: corpus BLEU-1..4 with sacrebleu, as an offline `evaluate` metric module.

Lives in the repo so `evaluate.load(<path to this folder>)` works without the Hugging Face Hub
(`evaluate.load("bleu")` needs the network). `evaluate` copies this file into its modules cache and
imports it there, so it must stay self-contained: no imports from `ris_core`.
"""

from __future__ import annotations

import datasets
import evaluate
import sacrebleu

_DESCRIPTION = """\
Corpus BLEU-1..4 (cumulative: BLEU-n is the brevity-penalised geometric mean of the 1..n-gram precisions)
computed by sacrebleu with its defaults (13a tokenizer, case-sensitive, exp smoothing), 0-100 scale.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated captions (str).
    references: one reference per prediction (list[str]) or several (list[list[str]]; counts may differ).
    lowercase: compare case-insensitively (default False, like sacrebleu).
Returns:
    bleu_1, bleu_2, bleu_3, bleu_4 (0-100), brevity_penalty (0-1), precisions (1..4-gram, 0-100),
    sys_len, ref_len.
Example:
    >>> m = evaluate.load("ris_core/metric_modules/ris_bleu")
    >>> m.compute(predictions=["Puma Men Black Shoes"], references=["Puma Men Black Shoes"])["bleu_4"]
    100.0
"""

_CITATION = """\
@inproceedings{post-2018-call,
  title = "A Call for Clarity in Reporting {BLEU} Scores",
  author = "Post, Matt",
  booktitle = "Proceedings of the Third Conference on Machine Translation",
  year = "2018",
  pages = "186--191",
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RisBleu(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # Several references per prediction first, then the single-reference form.
            features=[
                datasets.Features({
                    "predictions": datasets.Value("string", id="sequence"),
                    "references": datasets.Sequence(datasets.Value("string", id="sequence"), id="references"),
                }),
                datasets.Features({
                    "predictions": datasets.Value("string", id="sequence"),
                    "references": datasets.Value("string", id="sequence"),
                }),
            ],
            codebase_urls=["https://github.com/mjpost/sacrebleu"],
            reference_urls=["https://aclanthology.org/W18-6319"],
        )

    def _compute(self, predictions, references, lowercase: bool = False) -> dict:
        refs = [[r] if isinstance(r, str) else list(r) for r in references]
        if len(refs) != len(predictions):
            raise ValueError(f"{len(predictions)} predictions but {len(refs)} references")
        if not predictions:
            raise ValueError("no predictions to score")
        # sacrebleu wants one stream per reference slot; None pads predictions with fewer references.
        width = max(len(r) for r in refs)
        streams = [[r[i] if i < len(r) else None for r in refs] for i in range(width)]
        out: dict = {}
        for n in range(1, 5):
            score = sacrebleu.metrics.BLEU(max_ngram_order=n, lowercase=lowercase).corpus_score(
                list(predictions), streams)
            out[f"bleu_{n}"] = float(score.score)
            if n == 4:
                out["brevity_penalty"] = float(score.bp)
                out["precisions"] = [float(p) for p in score.precisions]
                out["sys_len"] = int(score.sys_len)
                out["ref_len"] = int(score.ref_len)
        return out
