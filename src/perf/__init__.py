"""Measurement, kept out of the library: benchmarks, the GPU check and the memory/FLOP estimator.

One entry point, ``python -m src.perf <command> [its arguments]`` (``src/perf/__main__.py``); each command's JSON goes
to ``experiments/``.
"""
