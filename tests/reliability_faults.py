"""Fault injection for the reliability tests and experiments/reliability (importable by `python -m src.train` runs:
put tests/ on PYTHONPATH and add e.g. `+callbacks.fault._target_=reliability_faults.KillAt +callbacks.fault.iteration=3`).
"""

from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path

import lightning as L
import numpy as np
import torch
import webdataset as wds

from src.io import atomic_path, write_checksum
from src.training.data import prompt_list


class KillAt(L.Callback):
    """SIGKILLs this process (rank 0) once `iteration` iterations are done: no handler, no flush, no cleanup."""

    def __init__(self, iteration: int):
        self.iteration = iteration

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        done = int(module.iteration) if hasattr(module, "iteration") else trainer.global_step
        if done == self.iteration and trainer.global_rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)


class InfLossAt(L.Callback):
    """Makes the loss of the listed iterations inf (one poisoned sample), via the task's `loss` method (critic_loss,
    dmd_loss)."""

    def __init__(self, iterations: list[int], value: float = float("inf"), loss: str = "critic_loss"):
        self.iterations, self.value, self.loss = set(iterations), value, loss

    def on_fit_start(self, trainer, module):
        original = getattr(module, self.loss)

        def poisoned(*args, **kwargs):
            loss = original(*args, **kwargs)
            return loss * self.value if int(module.iteration) in self.iterations else loss

        setattr(module, self.loss, poisoned)


class ExitAtRename(L.Callback):
    """Ends this process with os._exit (no handler, no flush, no cleanup) at the export's rename onto a file named
    `name` (`after=True`: just after it): a kill during the final export, between two of its writes."""

    def __init__(self, name: str, after: bool = False):
        self.name, self.after = name, after

    def on_train_end(self, trainer, module):  # callbacks' on_train_end runs before the module's, which exports
        replace = os.replace

        def dying(src, dst):
            if Path(dst).name == self.name:
                if self.after:
                    replace(src, dst)
                os._exit(9)
            return replace(src, dst)

        os.replace = dying


def write_pair_shards(shard_dir: str | Path, count: int, shape: tuple, per_shard: int = 4, seed: int = 0) -> list[Path]:
    """ODE-pair shards in the format PairShardWriter writes (random trajectories, toy prompts), with checksums."""
    shard_dir = Path(shard_dir)
    g = torch.Generator().manual_seed(seed)
    prompts = prompt_list("src.worlds.toy.shapes.training_prompts", count, seed + 1)
    sigmas = [1.0, 0.96, 8 / 9, 8 / 11, 0.0]
    paths = []
    for start in range(0, count, per_shard):
        path = shard_dir / f"ode-{start // per_shard:06d}.tar"
        with atomic_path(path) as tmp, wds.TarWriter(str(tmp)) as sink:
            for i in range(start, min(start + per_shard, count)):
                buffer = io.BytesIO()
                np.save(buffer, torch.randn(shape, generator=g).numpy(), allow_pickle=False)
                sink.write({"__key__": f"{i:08d}", "npy": buffer.getvalue(),
                            "json": json.dumps({"prompt": prompts[i], "sigmas": sigmas}).encode()})
        write_checksum(path)
        paths.append(path)
    return paths


def write_pair_manifest(shard_dir: str | Path, consumer_overrides: list[str]) -> dict:
    """The provenance record (src/artifacts.py) of hand-written pair shards, made to match the consumer composed from
    ``consumer_overrides``: the settings and ODE-teacher digest it will check, and the shards' digests."""
    from hydra import compose, initialize_config_dir

    from src.artifacts import MANIFEST, ODE_PAIRS, file_digest, input_file_digests, settings_of

    root = Path(__file__).resolve().parents[1]
    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[o for o in consumer_overrides if not o.startswith("hydra.")])
    shard_dir = Path(shard_dir)
    manifest = {"id": "hand-written-shards", "stage": ODE_PAIRS.name, "settings": settings_of(cfg, ODE_PAIRS, "consumer"),
                "input_files": input_file_digests(cfg, ODE_PAIRS), "inputs": {}, "run_dir": None,
                "command": ODE_PAIRS.command,
                "files": {p.name: file_digest(p) for p in sorted(shard_dir.iterdir()) if p.name != MANIFEST}}
    (shard_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest
