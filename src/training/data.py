"""Deterministic training streams: every sample a function of (run seed, iteration, global sample index).

A stream yields, for this rank, one batch per iteration starting at the iteration the run is at (restored from a
checkpoint on resume), so a resumed run reads exactly the batches the uninterrupted run would have read. The global
batch of an iteration has G = per-rank batch x world size samples; rank r holds the global indices that
`DistillTask.positions` assigns it ((micro * world + r) * size + k for each of its `micro_batches`), so the data does
not depend on how the global batch is split. A finite item set (prompts, trajectories) is read in epochs: the n-th
draw overall is item perm_e[n mod N] with e = n // N and perm_e a permutation seeded by (seed, stream, e).

Streams of the distillation (official HiAR, hiar_method.md §11): DMD and critic prompts stream over every line of the
prompt file, the critic drawing its own batch after the generator's (draws happen only on the iterations that use
them, in the official order); the forward-KL trajectories come from the ODE-pair shards as a second stream, drawn on
generator iterations. Both are positioned by the one iteration counter.
"""

from __future__ import annotations

import io
import json
import math
import re
import tarfile
from collections.abc import Callable
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from src.artifacts import verify_artifact
from src.io import InputError, read_prompt_file, verify_checksum
from src.sampling.noise import derived_seed

PROMPT_SOURCE = re.compile(r"src(\.\w+)+")  # a dotted function of this package, not a file

def prompt_list(source: str, num_prompts: int | None = None, seed: int = 0) -> list[str]:
    """A text file, one prompt per line (the first ``num_prompts``, or all); or a world's procedural prompt source
    named by its dotted function (the toy world: ``src.worlds.toy.shapes.training_prompts``), called with
    (num_prompts, seed)."""
    if not Path(source).is_file() and PROMPT_SOURCE.fullmatch(source):
        return hydra.utils.get_method(source)(num_prompts, seed)
    prompts = read_prompt_file(source)
    return prompts[:num_prompts] if num_prompts else prompts


# --------------------------------------------------------------------------------------------- shard index


class ShardIndex:
    """Random access to the samples of tar shards: every shard opened and walked once, each sample's members located
    by offset, their presence and (for .npy) shape checked, the shard's checksum verified if it has one.

    Errors name the shard and the sample key: a truncated shard, a sample missing a member, a shape that differs."""

    def __init__(self, shards: list[str], members: tuple[str, ...], npy_shape: tuple | None = None,
                 verify: bool = True):
        if not shards:
            raise InputError("no shards given")
        self.members = members
        self.samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
        self.shape: tuple | None = None
        for shard in shards:
            self._index(shard, verify)
        if npy_shape is not None and self.shape is not None:
            expected = tuple(npy_shape)
            if len(expected) != len(self.shape) or any(e not in (None, s) for e, s in zip(expected, self.shape)):
                raise InputError(f"shards {Path(shards[0]).parent}: samples have shape {list(self.shape)}, this run "
                                 f"expects {[e if e is not None else '*' for e in expected]}")

    def _index(self, shard: str, verify: bool) -> None:
        path = Path(shard)
        size = path.stat().st_size
        if size == 0:
            raise InputError(f"shard {path} is empty (0 bytes)")
        if verify:
            verify_checksum(path)  # a ChecksumError names the file
        by_key: dict[str, dict[str, tuple[int, int]]] = {}
        try:
            with tarfile.open(path, "r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, ext = member.name.partition(".")
                    if member.offset_data + member.size > size:
                        raise InputError(f"shard {path} is truncated: member {member.name} ends past the file's end")
                    by_key.setdefault(key, {})[ext] = (member.offset_data, member.size)
        except tarfile.TarError as e:
            raise InputError(f"shard {path} is not a readable tar file ({e}); is it truncated?") from None
        if not by_key:
            raise InputError(f"shard {path} holds no samples")
        with open(path, "rb") as f:
            for key, found in by_key.items():
                missing = [m for m in self.members if m not in found]
                if missing:
                    raise InputError(f"shard {path}: sample {key} lacks {missing} (has {sorted(found)}); "
                                     "the shard is truncated or was written by another program")
                if "npy" in found:
                    self._check_npy(f, found["npy"], f"shard {path}: sample {key}")
                self.samples.append((str(path), found))

    def _check_npy(self, f, location: tuple[int, int], where: str) -> None:
        offset, length = location
        f.seek(offset)
        head = io.BytesIO(f.read(min(length, 4096)))
        try:
            version = np.lib.format.read_magic(head)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(head)
        except ValueError as e:
            raise InputError(f"{where}: .npy header unreadable ({e})") from None
        if length != head.tell() + math.prod(shape) * dtype.itemsize:
            raise InputError(f"{where}: .npy holds {length} bytes, its header {list(shape)} {dtype} needs "
                             f"{head.tell() + math.prod(shape) * dtype.itemsize}")
        if self.shape is None:
            self.shape = tuple(shape)
        elif tuple(shape) != self.shape:
            raise InputError(f"{where}: shape {list(shape)} differs from the first sample's {list(self.shape)}")

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> dict[str, bytes]:
        shard, found = self.samples[index]
        out = {}
        with open(shard, "rb") as f:
            for ext in self.members:
                offset, length = found[ext]
                f.seek(offset)
                out[ext] = f.read(length)
        return out


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


# --------------------------------------------------------------------------------------------- positions


class EpochOrder:
    """The n-th draw of a stream over N items: perm_e[n mod N], e = n // N, perm_e seeded by (seed, stream, e)."""

    def __init__(self, size: int, seed: int, stream: str, shuffle: bool = True):
        if size < 1:
            raise InputError(f"stream {stream!r} has no items")
        self.size, self.seed, self.stream, self.shuffle = size, seed, stream, shuffle
        self._epoch, self._perm = None, None

    def __call__(self, draw: int) -> int:
        epoch, offset = divmod(draw, self.size)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(derived_seed(self.seed, self.stream, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=g).tolist()
        return self._perm[offset]


def rank_positions(batch_size: int, rank: int, world_size: int, micro_batches: int = 1) -> list[int]:
    """Global indices of this rank's samples in an iteration's global batch (DistillTask.positions' layout)."""
    if batch_size % micro_batches:
        raise InputError(f"batch_size={batch_size} is not divisible into {micro_batches} micro-batches")
    size = batch_size // micro_batches
    return [(m * world_size + rank) * size + k for m in range(micro_batches) for k in range(size)]


class PositionalStream(IterableDataset):
    """This rank's batches from iteration `start` on: make_batch(iteration, global indices) for each iteration; with
    several loader workers, worker w builds iterations start + w, start + w + W, ... (the loader interleaves them back
    in order)."""

    def __init__(self, make_batch: Callable[[int, list[int]], dict], positions: list[int], start: int):
        self.make_batch, self.positions, self.start = make_batch, positions, start

    def __iter__(self):
        worker = get_worker_info()
        index, count = (worker.id, worker.num_workers) if worker else (0, 1)
        iteration = self.start + index
        while True:
            batch = self.make_batch(iteration, self.positions)
            batch["iteration"] = torch.tensor(iteration)
            batch["index"] = torch.tensor(self.positions)
            yield batch
            iteration += count


def run_position(trainer) -> tuple[int, int, int]:
    """(iteration to start at, rank, world size): the task's own iteration counter when it has one (the distillation
    counts iterations, its optimizer steps are 1 or 2 per iteration), else the batches the optimizer steps took
    (automatic optimisation: `accumulate_grad_batches` per step; checkpoints fall on step boundaries)."""
    if trainer is None:
        return 0, 0, 1
    module = trainer.lightning_module
    iteration = int(module.iteration) if isinstance(getattr(module, "iteration", None), torch.Tensor) \
        else trainer.global_step * trainer.accumulate_grad_batches
    return iteration, trainer.global_rank, trainer.world_size


def loader(stream: PositionalStream, num_workers: int) -> DataLoader:
    return DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0)


# --------------------------------------------------------------------------------------------- ODE pairs


def pair_shards(shard_dir: str | Path) -> list[str]:
    shards = sorted(str(p) for p in Path(shard_dir).glob("ode-*.tar"))
    if not shards:
        raise InputError(f"no ODE-pair shards in {shard_dir}: run `python -m src.train experiment=ode_pairs` first")
    verify_artifact(shard_dir)  # the shards are those their manifest records (src/artifacts.py)
    return shards


class TrajectoryReader:
    """Trajectory i of the ODE-pair shards: {"trajectory" [K, F, C, h, w], "sigmas" [K], "prompt"}."""

    def __init__(self, shard_dir: str, verify_checksums: bool = True, expected_shape: tuple | None = None):
        self.index = ShardIndex(pair_shards(shard_dir), ("npy", "json"), expected_shape, verify_checksums)

    def __len__(self):
        return len(self.index)

    def __call__(self, i: int) -> dict:
        raw = self.index.read(i)
        meta = json.loads(raw["json"])
        return {"trajectory": torch.from_numpy(load_npy(raw["npy"])), "sigmas": torch.tensor(meta["sigmas"]),
                "prompt": meta["prompt"]}


def collate_pairs(samples: list[dict]) -> dict:
    return {"trajectory": torch.stack([s["trajectory"] for s in samples]),
            "sigmas": torch.stack([s["sigmas"] for s in samples]), "prompt": [s["prompt"] for s in samples]}


class OdePairsDataModule(L.LightningDataModule):
    """ODE-init batches: iteration i reads draws i * G + j (G = global batch) of the trajectory stream. The shards
    are indexed and checked when the module is built, before any model is loaded."""

    def __init__(self, shard_dir: str, batch_size: int = 4, num_workers: int = 0, seed: int = 0,
                 shuffle: bool = True, verify_checksums: bool = True):
        super().__init__()
        self.save_hyperparameters()
        self.pairs = TrajectoryReader(shard_dir, verify_checksums)

    def train_dataloader(self):
        hp = self.hparams
        start, rank, world = run_position(self.trainer)
        order = EpochOrder(len(self.pairs), hp.seed, "ode_pairs", hp.shuffle)
        global_batch = hp.batch_size * world

        def make_batch(iteration: int, positions: list[int]) -> dict:
            return collate_pairs([self.pairs(order(iteration * global_batch + j)) for j in positions])

        return loader(PositionalStream(make_batch, rank_positions(hp.batch_size, rank, world), start), hp.num_workers)


# --------------------------------------------------------------------------------------------- distillation


class DistillDataModule(L.LightningDataModule):
    """The distillation's two streams (official HiAR): prompts over the whole prompt file for DMD and the critic, and
    forward-KL trajectories from the ODE-pair shards.

    Iteration i draws, in the official order, a generator batch (when i % gen_update_ratio == 0) then a critic batch
    from the prompt stream, and on generator iterations a trajectory batch. Batches: {"critic_prompt": list} and, on
    generator iterations, {"prompt": list} plus {"trajectory", "sigmas", "trajectory_prompt"} when `fkl_weight` > 0.
    `gen_update_ratio`, `grad_accumulation` and `fkl_weight` are the task's (conf/data/distill.yaml interpolates them
    from `task`), so the stream and the task agree by construction."""

    def __init__(self, prompts: str, *, gen_update_ratio: int, grad_accumulation: int, fkl_weight: float,
                 shard_dir: str | None = None, batch_size: int = 4, num_prompts: int | None = None,
                 num_workers: int = 0, seed: int = 0, shuffle: bool = True, verify_checksums: bool = True):
        super().__init__()
        self.save_hyperparameters()
        if float(fkl_weight) > 0 and not shard_dir:
            raise InputError("the task's fkl.weight > 0 needs ODE-pair trajectories: set data.shard_dir")
        self.prompts = prompt_list(prompts, num_prompts, seed)
        self.pairs = TrajectoryReader(shard_dir, verify_checksums) if shard_dir else None

    def train_dataloader(self):
        hp = self.hparams
        start, rank, world = run_position(self.trainer)
        ratio, micro, fkl = int(hp.gen_update_ratio), int(hp.grad_accumulation), float(hp.fkl_weight) > 0
        prompt_order = EpochOrder(len(self.prompts), hp.seed, "prompts", hp.shuffle)
        pair_order = EpochOrder(len(self.pairs), hp.seed, "ode_pairs", hp.shuffle) if fkl else None
        global_batch = hp.batch_size * world

        def make_batch(iteration: int, positions: list[int]) -> dict:
            generator_draws = -(-iteration // ratio)  # generator iterations before this one
            draw = iteration + generator_draws  # prompt batches drawn before this iteration
            batch = {}
            if iteration % ratio == 0:
                batch["prompt"] = [self.prompts[prompt_order(draw * global_batch + j)] for j in positions]
                draw += 1
                if fkl:
                    pairs = collate_pairs([self.pairs(pair_order(generator_draws * global_batch + j))
                                           for j in positions])
                    batch.update(trajectory=pairs["trajectory"], sigmas=pairs["sigmas"],
                                 trajectory_prompt=pairs["prompt"])
            batch["critic_prompt"] = [self.prompts[prompt_order(draw * global_batch + j)] for j in positions]
            return batch

        positions = rank_positions(hp.batch_size, rank, world, micro)
        return loader(PositionalStream(make_batch, positions, start), hp.num_workers)
