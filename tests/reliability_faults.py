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
from src.training.streams import prompt_list


class KillAt(L.Callback):
    """SIGKILLs this process (rank 0) once `iteration` iterations are done: no handler, no flush, no cleanup."""

    def __init__(self, iteration: int):
        self.iteration = iteration

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        done = int(module.iteration) if hasattr(module, "iteration") else trainer.global_step
        if done == self.iteration and trainer.global_rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)


class InfLossAt(L.Callback):
    """Makes the critic loss of the listed iterations inf (one poisoned sample), via the task's critic_loss."""

    def __init__(self, iterations: list[int], value: float = float("inf")):
        self.iterations, self.value = set(iterations), value

    def on_fit_start(self, trainer, module):
        original = module.critic_loss

        def poisoned(*args, **kwargs):
            loss = original(*args, **kwargs)
            return loss * self.value if int(module.iteration) in self.iterations else loss

        module.critic_loss = poisoned


def write_pair_shards(shard_dir: str | Path, count: int, shape: tuple, per_shard: int = 4, seed: int = 0) -> list[Path]:
    """ODE-pair shards in the format PairShardWriter writes (random trajectories, toy prompts), with checksums."""
    shard_dir = Path(shard_dir)
    g = torch.Generator().manual_seed(seed)
    prompts = prompt_list("toy", count, seed + 1)
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
