"""training.report prints the README's tables from a run's files (here: the committed reference evaluation)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from ris_core.runs import Run
from training.report import compare_table, main

REFERENCE = Path(__file__).resolve().parents[1] / "results/runs/reference-cpu"


def test_the_comparison_puts_each_runs_figures_in_its_own_column(tmp_path: Path) -> None:
    other = tmp_path / "grouped"
    shutil.copytree(REFERENCE, other, ignore=shutil.ignore_patterns("model", "split.json"))
    info = json.loads((other / "run.json").read_text())
    info["args"]["split_by"] = "name"
    (other / "run.json").write_text(json.dumps(info))
    metrics = json.loads((other / "eval/caption_metrics.json").read_text())
    metrics["subsets"]["novel"]["model"]["bleu_4"] = 12.345
    (other / "eval/caption_metrics.json").write_text(json.dumps(metrics))
    table = compare_table([Run(REFERENCE), Run(other)]).splitlines()
    assert table[0] == "| | reference-cpu | grouped |"
    assert "| split | by product | by name |" in table
    committed = json.loads((REFERENCE / "eval/caption_metrics.json").read_text())
    everyone = f"{committed['model']['bleu_4']:.1f}"
    bleu = next(line for line in table if line.startswith("| BLEU-4, greedy"))
    novel = f"{committed['subsets']['novel']['model']['bleu_4']:.1f}"
    assert bleu == f"| BLEU-4, greedy: all / novel | {everyone} / {novel} | {everyone} / 12.3 |"
    hybrid = next(line for line in table if line.startswith("| hybrid: P@10 R1, all / novel |"))
    hybrid = hybrid.strip(" |").split(" | ")
    assert hybrid[1] == hybrid[2] and hybrid[1].count(" / ") == 1  # the untouched figures, the same in both columns


def test_the_report_prints_every_section(capsys) -> None:
    main(["--run", str(REFERENCE)])
    out = capsys.readouterr().out
    for heading in ("### Training history", "### Caption quality: seen and novel products", "### Verdict (R1)",
                    "### Retrieval (R1, novel products)", "### Refinement (R3)"):
        assert heading in out
    novel = out.split("### Retrieval (R1, novel products)")[1].split("###")[0]
    assert "| image_knn:encoder |" in novel and "Paired P@10" not in novel  # the pairs are over all products


def test_the_papers_table_one_is_kept_whole_beside_the_notebooks_later_figure():
    from ris_core.runs import RESULTS_DIR, Run

    paper = Run(RESULTS_DIR / "paper-2024")
    history = paper.history()
    assert history["epoch"].tolist() == [1, 2, 3, 4, 5]  # the paper's epochs 0-4, as epochs completed
    assert history[["train_loss", "train_perplexity", "val_loss", "val_perplexity"]].notna().all().all()
    assert history["val_perplexity"].iloc[-1] == pytest.approx(3.178422)
    info = paper.info()
    assert info["best_epoch"] == 5 and info["notebook_best"]["val_perplexity"] == 3.105
    shared = Path(__file__).resolve().parents[2] / "shared" / "paper" / "table-1.csv"
    if shared.is_file():  # beside the shared data: the copy is exact
        table = pd.read_csv(shared)
        pd.testing.assert_frame_equal(history[table.columns].assign(epoch=history["epoch"] - 1), table)
