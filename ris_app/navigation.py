"""The dashboard's pages in menu order: one list for dashboard.py, the overview's links, tests and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PageSpec:
    path: str  # relative to the repository root, as st.Page wants it
    title: str
    icon: str
    about: str  # what the page answers, for the overview's links

    @property
    def stem(self) -> str:
        return self.path.rsplit("/", 1)[-1].removesuffix(".py")


PAGES = [
    PageSpec("pages/overview.py", "Overview", ":material/dashboard:",
             "the chosen run's headline numbers and the paper's claim tested"),
    PageSpec("pages/training_curves.py", "Training curves", ":material/show_chart:",
             "loss and perplexity per epoch, several runs and the paper's figure overlaid"),
    PageSpec("pages/caption_quality.py", "Caption quality", ":material/subtitles:",
             "BLEU and matches on the held-out products, every caption beside its reference"),
    PageSpec("pages/compare_captions.py", "Compare captions", ":material/difference:",
             "several runs' captions per product, words marked against the name; a link reopens the view"),
    PageSpec("pages/query_strategies.py", "Query strategies", ":material/manage_search:",
             "one product's queries and results side by side; P@k, MRR and nDCG with intervals"),
    PageSpec("pages/search_demo.py", "Search demo", ":material/image_search:",
             "upload a photo: caption, queries, catalog / web / visual results"),
]
PAGE_PATHS = [page.path for page in PAGES]
