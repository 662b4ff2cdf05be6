"""RIS Eval core library: data, captioner, metrics, query strategies, search backends.

Never imports Streamlit or `training`; the dashboard and the training CLIs import this.
"""

__version__ = "0.1.0"
