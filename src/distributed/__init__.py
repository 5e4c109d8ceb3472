"""Distributed training: Trainer strategies (strategies.py) and the per-rank entry point (launch.py)."""
