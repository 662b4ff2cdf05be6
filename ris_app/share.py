"""Shareable views: a page's widgets seeded from the link's query parameters, and the link to the current view.

A page names its widgets' keys and parameters once (`Param`); `restore` seeds the widgets from the URL the
first time the page runs in a session (afterwards the visitor's choices win), `publish` writes the current
choices back into the address bar, and `link` shows the URL with a copy button.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlencode

import streamlit as st


@dataclass(frozen=True)
class Param:
    key: str  # the widget's key
    name: str  # the query parameter
    parse: Callable[[str], object] = str
    many: bool = False  # a multiselect: the parameter repeats


def restore(page: str, params: list[Param]) -> None:
    """Seed the widgets from the URL once per session and page; a value that does not parse is ignored."""
    flag = f"_url_restored_{page}"
    if st.session_state.get(flag):
        return
    st.session_state[flag] = True
    for p in params:
        if p.name not in st.query_params:
            continue
        values = st.query_params.get_all(p.name)
        try:
            st.session_state[p.key] = [p.parse(v) for v in values] if p.many else p.parse(values[-1])
        except ValueError:
            continue


def publish(params: list[Param], extra: dict[str, object] | None = None) -> dict[str, object]:
    """The current widget values as query parameters, also put into the address bar."""
    out: dict[str, object] = dict(extra or {})
    for p in params:
        value = st.session_state.get(p.key)
        if value in (None, [], "", "all", False):
            continue
        out[p.name] = [str(v) for v in value] if p.many else str(value)
    st.query_params.from_dict(out)
    return out


def link(params: dict[str, object], page: str) -> None:
    """The link to this view, in a code box (its copy button copies it)."""
    base = (getattr(st.context, "url", None) or "").split("?")[0] or f"/{page}"
    st.caption("Link to this view:")
    st.code(base + "?" + urlencode(params, doseq=True), language=None)


def flag(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise ValueError(text)
