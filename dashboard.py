"""RIS Eval dashboard: training curves, caption quality, query strategies and a search demo.

    streamlit run dashboard.py                    # or: make run
    RIS_RUNS_DIRS=/tmp/runs RIS_DATA_DIR=/data/fashion streamlit run dashboard.py
"""

import streamlit as st

PAGES = [
    st.Page("pages/training_curves.py", title="Training curves", icon=":material/show_chart:", default=True),
    st.Page("pages/caption_quality.py", title="Caption quality", icon=":material/subtitles:"),
    st.Page("pages/query_strategies.py", title="Query strategies", icon=":material/manage_search:"),
    st.Page("pages/search_demo.py", title="Search demo", icon=":material/image_search:"),
]


def run() -> None:
    st.set_page_config(layout="wide", page_title="RIS Eval", page_icon=":material/image_search:")
    st.navigation(PAGES).run()


run()
