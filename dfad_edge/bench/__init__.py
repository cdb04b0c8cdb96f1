"""Stage 3: accuracy, latency and size for every backend and precision, student against teacher."""

from .runner import BACKENDS, PRECISIONS, BenchOptions, run_bench

__all__ = ["BACKENDS", "PRECISIONS", "BenchOptions", "run_bench"]
