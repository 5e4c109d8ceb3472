"""Evaluation: HiAR drift metrics, VBench (own environment), toy-world oracle scores, and the report.

Kept import-light on purpose: `evaluation/vbench_runner.py` is also executed by the VBench environment's Python.
"""
