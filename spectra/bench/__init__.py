"""Benchmarks: this machine's speed for spectra's paths, side by side with peers.

Library functions only (the CLI calls them); each writes Markdown, JSON and a plot.
"""

from spectra.bench.svd import run_svd_bench

__all__ = ["run_svd_bench"]
