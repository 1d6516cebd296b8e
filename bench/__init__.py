"""metabench harness: sources, sampling, benchmarks, runs, results, statistics, plots, CLI."""

__version__ = "0.1.0"
