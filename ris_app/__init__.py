"""App-only helpers for the Streamlit dashboard: the shared sidebar, cached loaders, charts and widgets.

`ris_core` stays Streamlit-free; everything that imports `streamlit` lives here or in `pages/`.
"""
