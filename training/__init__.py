"""Training and evaluation CLIs; they write results/runs/<name>/ and import ris_core."""
