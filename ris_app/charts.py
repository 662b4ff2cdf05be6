"""Plotly figures for the pages: training curves, sentence-BLEU histogram, retrieval metrics with 95% CIs."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

PALETTE = qualitative.Plotly
METRIC_LABELS = {"p_at_1": "P@1", "p_at_5": "P@5", "p_at_10": "P@10", "mrr": "MRR", "ndcg_at_10": "nDCG@10"}
SOURCE_STYLE = {  # how each kind of retrieval row looks: captions solid, upper bounds hatched, the baseline grey
    "caption": {"color": "#1f77b4", "pattern": "", "label": "caption strategy"},
    "reranked": {"color": "#9467bd", "pattern": "", "label": "reranked caption (model + nearest names)"},
    "refine": {"color": "#2ca02c", "pattern": ".", "label": "refined (re-ranked by agreement, paper §IV-B)"},
    "oracle": {"color": "#ff9f40", "pattern": "/", "label": "oracle (reference name as caption)"},
    "visual": {"color": "#7f7f7f", "pattern": "x", "label": "visual baseline (no caption)"},
    "hybrid": {"color": "#d62728", "pattern": "", "label": "hybrid (caption text + image)"},
}


@dataclass
class Curve:
    label: str
    history: pd.DataFrame
    reported: bool = False


def _layout(fig: go.Figure, height: int, legend_below: bool = True) -> go.Figure:
    legend = {"orientation": "h", "yanchor": "top", "y": -0.22, "x": 0} if legend_below else {
        "orientation": "h", "yanchor": "bottom", "y": 1.08, "x": 0}
    fig.update_layout(height=height, margin={"l": 10, "r": 10, "t": 30, "b": 10}, hovermode="closest", legend=legend)
    return fig


def curves_figure(curves: list[Curve], quantity: str, log_y: bool = False, height: int = 420) -> go.Figure:
    """Train and validation `quantity` ("loss" or "perplexity") per epoch; best epoch (min val loss) starred.

    Own runs: validation solid, training dotted. Reported runs: dashed / dash-dot, labelled "reported".
    """
    fig = go.Figure()
    for i, curve in enumerate(curves):
        color = PALETTE[i % len(PALETTE)]
        frame = curve.history.sort_values("epoch")
        name = f"{curve.label} (reported)" if curve.reported else curve.label
        dashes = (("val", "dash"), ("train", "dashdot")) if curve.reported else (("val", "solid"), ("train", "dot"))
        for split, dash in dashes:
            column = f"{split}_{quantity}"
            if column not in frame or frame[column].notna().sum() == 0:
                continue
            points = frame[["epoch", column]].dropna()
            fig.add_trace(go.Scatter(
                x=points["epoch"], y=points[column], mode="lines+markers", name=f"{name} · {split}",
                line={"color": color, "dash": dash, "width": 2.5 if split == "val" else 1.5},
                marker={"size": 7 if split == "val" else 5},
                hovertemplate=f"<b>{name}</b><br>{split} {quantity}: %{{y:.4g}}<br>epoch %{{x}}<extra></extra>",
            ))
        best = best_epoch(frame)
        column = f"val_{quantity}"
        if best is not None and column in frame:
            row = frame.loc[frame["epoch"] == best].iloc[0]
            if pd.notna(row[column]):
                fig.add_trace(go.Scatter(
                    x=[best], y=[row[column]], mode="markers+text", text=["best"], textposition="top center",
                    marker={"symbol": "star", "size": 15, "color": color, "line": {"width": 1, "color": "black"}},
                    name=f"{name} · best epoch", showlegend=False,
                    hovertemplate=f"<b>{name}</b><br>best epoch %{{x}} (lowest val loss)<br>val {quantity}: "
                                  "%{y:.4g}<extra></extra>",
                ))
    fig.update_xaxes(title="epoch", dtick=1 if _few_integer_epochs(curves) else None)
    fig.update_yaxes(title=quantity, type="log" if log_y else "linear")
    return _layout(fig, height)


def best_epoch(history: pd.DataFrame) -> float | None:
    """The epoch with the lowest validation loss, or None when no validation loss is known."""
    if "val_loss" not in history or history["val_loss"].notna().sum() == 0:
        return None
    return history.loc[history["val_loss"].idxmin(), "epoch"]


def _few_integer_epochs(curves: list[Curve]) -> bool:
    epochs = pd.concat([c.history["epoch"] for c in curves]) if curves else pd.Series(dtype=float)
    return bool(len(epochs)) and bool((epochs % 1 == 0).all()) and epochs.max() <= 30


def bleu_histogram(scores: pd.Series, height: int = 300) -> go.Figure:
    fig = go.Figure(go.Histogram(
        x=scores, xbins={"start": 0, "end": 100, "size": 5}, marker={"color": PALETTE[0]},
        hovertemplate="sentence BLEU %{x}<br>%{y} products<extra></extra>",
    ))
    fig.update_xaxes(title="sentence BLEU (0-100)", range=[0, 100])
    fig.update_yaxes(title="products")
    fig.update_layout(bargap=0.05)
    return _layout(fig, height)


def strategy_figure(rows: pd.DataFrame, metrics: list[str], height: int = 380) -> go.Figure:
    """One panel per metric, one horizontal bar per strategy with its 95% bootstrap interval.

    `rows`: retrieval.json rows of one relevance level (strategy, source, <metric>, <metric>_ci).
    """
    order = rows.sort_values(["source", "strategy"], key=lambda s: s.map(_source_rank) if s.name == "source" else s)
    strategies = order["strategy"].tolist()
    fig = make_subplots(rows=1, cols=len(metrics), shared_yaxes=True, horizontal_spacing=0.02,
                        subplot_titles=[METRIC_LABELS.get(m, m) for m in metrics])
    shown: set[str] = set()
    for col, metric in enumerate(metrics, start=1):
        for source, group in order.groupby("source", sort=False):
            style = SOURCE_STYLE.get(source, SOURCE_STYLE["caption"])
            values = group[metric].astype(float)
            lows = [ci[0] if isinstance(ci, list | tuple) else None for ci in group[f"{metric}_ci"]]
            highs = [ci[1] if isinstance(ci, list | tuple) else None for ci in group[f"{metric}_ci"]]
            plus = [None if h is None else h - v for h, v in zip(highs, values, strict=True)]
            minus = [None if lo is None else v - lo for lo, v in zip(lows, values, strict=True)]
            fig.add_trace(go.Bar(
                y=group["strategy"], x=values, orientation="h", name=style["label"], legendgroup=source,
                showlegend=source not in shown,
                marker={"color": style["color"], "pattern": {"shape": style["pattern"]}},
                error_x={"type": "data", "array": plus, "arrayminus": minus, "visible": True, "thickness": 1.2},
                customdata=list(zip(lows, highs, strict=True)),
                hovertemplate=f"<b>%{{y}}</b><br>{METRIC_LABELS.get(metric, metric)} %{{x:.3f}}"
                              "<br>95% CI [%{customdata[0]:.3f}, %{customdata[1]:.3f}]<extra></extra>",
            ), row=1, col=col)
            shown.add(source)
        fig.update_xaxes(range=[0, 1.05], row=1, col=col, tickformat=".1f")
    fig.update_yaxes(categoryorder="array", categoryarray=strategies[::-1], row=1, col=1)
    return _layout(fig, max(height, 60 + 26 * len(strategies)))


def _source_rank(source: str) -> int:
    return {"caption": 0, "reranked": 1, "hybrid": 2, "refine": 3, "visual": 4, "oracle": 5}.get(source, 6)
