"""Plotly figures for the pages: training curves, sentence-BLEU histogram, retrieval metrics with 95% CIs."""

from __future__ import annotations

import re
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


def export(*parts: object, image_format: str = "png") -> dict:
    """st.plotly_chart's config: the camera button saves the chart as `<run>-<view>.png` (or svg), 2x scale."""
    name = "-".join(str(p) for p in parts if p not in (None, ""))
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "chart"
    return {"toImageButtonOptions": {"format": image_format, "filename": safe, "scale": 2},
            "displaylogo": False}


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


def smooth(values: pd.Series, weight: float) -> pd.Series:
    """TensorBoard's smoothing: an exponential moving average, debiased so the first points are not pulled to 0.
    NaNs are skipped (kept NaN); weight 0 returns the values unchanged."""
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out, last, steps = [], 0.0, 0
    for value in values.astype(float):
        if pd.isna(value):
            out.append(float("nan"))
            continue
        steps += 1
        last = last * weight + (1 - weight) * value
        out.append(last / (1 - weight**steps))
    return pd.Series(out, index=values.index)


def curves_figure(curves: list[Curve], quantity: str, log_y: bool = False, height: int = 420,
                  smoothing: float = 0.0) -> go.Figure:
    """Train and validation `quantity` ("loss" or "perplexity") per epoch; best epoch (min val loss) starred.

    Validation: thick lines, filled markers; training: thin lines, open markers. Runs measured here are solid,
    reported runs (numbers from a paper) dashed with diamonds. With smoothing, the raw points stay faint behind.
    """
    fig = go.Figure()
    for i, curve in enumerate(curves):
        color = PALETTE[i % len(PALETTE)]
        frame = curve.history.sort_values("epoch")
        name = f"{curve.label} (reported)" if curve.reported else curve.label
        for split in ("val", "train"):
            column = f"{split}_{quantity}"
            if column not in frame or frame[column].notna().sum() == 0:
                continue
            points = frame[["epoch", column]].dropna()
            symbol = "diamond" if curve.reported else "circle"
            style = {"line": {"color": color, "dash": "dash" if curve.reported else "solid",
                              "width": 2.5 if split == "val" else 1.2},
                     "marker": {"size": 7 if split == "val" else 6,
                                "symbol": symbol if split == "val" else f"{symbol}-open"}}
            y = points[column] if smoothing == 0 else smooth(points[column], smoothing)
            if smoothing:
                fig.add_trace(go.Scatter(x=points["epoch"].tolist(), y=points[column].tolist(), mode="markers",
                                         opacity=0.3, marker=style["marker"] | {"color": color}, showlegend=False,
                                         legendgroup=curve.label, hoverinfo="skip", name=f"{name} · {split} raw"))
            fig.add_trace(go.Scatter(
                x=points["epoch"].tolist(), y=y.tolist(), mode="lines+markers", name=f"{name} · {split}",
                legendgroup=curve.label, **style,
                opacity=1.0 if split == "val" else 0.75,
                hovertemplate=f"<b>{name}</b><br>{split} {quantity}{' (smoothed)' if smoothing else ''}: "
                              "%{y:.4g}<br>epoch %{x}<extra></extra>",
            ))
        best = best_epoch(frame)
        column = f"val_{quantity}"
        if best is not None and column in frame:
            row = frame.loc[frame["epoch"] == best].iloc[0]
            if pd.notna(row[column]):
                fig.add_trace(go.Scatter(
                    x=[best], y=[row[column]], mode="markers+text", text=["best"], textposition="top center",
                    marker={"symbol": "star", "size": 15, "color": color, "line": {"width": 1, "color": "black"}},
                    name=f"{name} · best epoch", showlegend=False, legendgroup=curve.label,
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


def precision_curve_figure(curves: pd.DataFrame, height: int = 380) -> go.Figure:
    """P@k against k per strategy (rows of `ris_core.evaluation.precision_curves`), each with its 95% band."""
    fig = go.Figure()
    for i, (strategy, group) in enumerate(curves.groupby("strategy", sort=False)):
        color = PALETTE[i % len(PALETTE)]
        group = group.sort_values("k")
        fig.add_trace(go.Scatter(  # the band: high forwards, low backwards, filled
            x=[*group["k"].tolist(), *group["k"].tolist()[::-1]],
            y=[*group["high"].tolist(), *group["low"].tolist()[::-1]], fill="toself",
            fillcolor=color, opacity=0.18, line={"width": 0}, hoverinfo="skip", showlegend=False,
            legendgroup=strategy, name=f"{strategy} 95% band"))
        fig.add_trace(go.Scatter(
            x=group["k"].tolist(), y=group["precision"].tolist(), mode="lines+markers", name=strategy,
            legendgroup=strategy,
            line={"color": color, "width": 2}, marker={"size": 5},
            customdata=group[["low", "high"]].to_numpy().tolist(),
            hovertemplate=f"<b>{strategy}</b><br>P@%{{x}} %{{y:.3f}}<br>95% CI [%{{customdata[0]:.3f}}, "
                          "%{customdata[1]:.3f}]<extra></extra>"))
    fig.update_xaxes(title="k (results judged)", dtick=1)
    fig.update_yaxes(title="precision at k", tickformat=".2f")
    return _layout(fig, height)


def category_figure(table: pd.DataFrame, metric: str, label: str, by: str, height: int = 420) -> go.Figure:
    """One horizontal bar per category (`ris_core.evaluation.categories.per_category` rows), counts at the bars."""
    percent = metric != "bleu_4"
    fig = go.Figure(go.Bar(
        y=table["category"].tolist(), x=table[metric].tolist(), orientation="h", marker={"color": PALETTE[0]},
        text=[f"n={n}" for n in table["products"]], textposition="outside", cliponaxis=False,
        customdata=table["products"].tolist(),
        hovertemplate=f"<b>%{{y}}</b><br>{label} %{{x:{'.1%' if percent else '.1f'}}}<br>%{{customdata}} products"
                      "<extra></extra>"))
    fig.update_xaxes(title=label, tickformat=".0%" if percent else None)
    # the table comes worst first: reversed, so the worst bar is at the top where the eye starts
    fig.update_yaxes(title=by, categoryorder="array", categoryarray=table["category"].tolist(), autorange="reversed")
    return _layout(fig, max(height, 60 + 22 * len(table)))
