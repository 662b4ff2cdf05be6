"""RIS Eval dashboard: an overview, training curves, caption quality, query strategies and a search demo.

    streamlit run dashboard.py                    # or: make run
    RIS_RUNS_DIRS=/tmp/runs RIS_DATA_DIR=/data/fashion streamlit run dashboard.py
"""

import streamlit as st

from ris_app.navigation import PAGES


def run() -> None:
    st.set_page_config(layout="wide", page_title="RIS Eval", page_icon=":material/image_search:")
    pages = [st.Page(p.path, title=p.title, icon=p.icon, default=i == 0) for i, p in enumerate(PAGES)]
    st.navigation(pages).run()


run()
