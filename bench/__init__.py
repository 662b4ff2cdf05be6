"""Benchmarks of RIS Eval on this machine: `make bench` (`python -m bench.run`), `--quick` for a smoke run."""
