"""Benchmark evaluation (CoBSAT). Command line: python -m thinkdiff_core.eval.cobsat --help."""
