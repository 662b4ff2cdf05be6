"""Evaluation of a run: `pipeline.evaluate_run` computes its eval/ folder; `files` names and reads what it wrote.

`files` imports no model code (pages read evaluations without torch); `pipeline` loads the captioner.
"""
