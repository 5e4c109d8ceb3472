"""Toy-world videos as webdataset shards (written by one command) and a datamodule that reads them or renders on the fly.

Write:  python -m src.worlds.toy.data --out data/toy_videos --num-videos 8000 --frames 21
The folder's `manifest.json` records how the shards were made (generator fingerprint, frames, size); the datamodule
refuses shards whose generator or shape differ from what it was asked for.
A sample is `<key>.npy` (uint8 video [T, 3, H, W]), `<key>.json` (attributes, seed, prompt) and `<key>.txt` (prompt).
Batches are {"video": float [B, T, 3, H, W] in [-1, 1], "prompt": list[str], "iteration", "index"} (the stream's
position: the iteration and the samples' global indices, which key the teacher's per-sample draws).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import numpy as np
import torch
import webdataset as wds

from src.sampling.noise import derived_seed
from src.training.data import EpochOrder, PositionalStream, ShardIndex, load_npy, loader, rank_positions, run_position
from src.worlds.toy.shapes import (
    generator_fingerprint,
    prompt_from_attributes,
    render_video,
    sample_attributes,
    training_attributes,
)

SHARD_PATTERN = "toy-%06d.tar"
MANIFEST = "manifest.json"


def to_uint8(video: torch.Tensor) -> np.ndarray:
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def from_uint8(video) -> torch.Tensor:
    return torch.as_tensor(video).float() / 127.5 - 1


def random_sample(rng: np.random.Generator, num_frames: int, height: int, width: int, fixed: dict | None = None) -> dict:
    attrs = sample_attributes(rng, fixed)
    seed = int(rng.integers(2**31))
    return {"attrs": attrs, "seed": seed, "prompt": prompt_from_attributes(attrs),
            "video": render_video(attrs, num_frames, height, width, seed)}


def write_shards(out_dir: str | Path, num_videos: int, num_frames: int = 21, height: int = 16, width: int = 16,
                 seed: int = 0, videos_per_shard: int = 2000) -> list[str]:
    """Render num_videos training videos into webdataset shards under out_dir; returns the shard paths."""
    if num_videos < 1:
        raise ValueError(f"num_videos must be >= 1, got {num_videos}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with wds.ShardWriter(str(out_dir / SHARD_PATTERN), maxcount=videos_per_shard, verbose=0) as sink:
        for index in range(num_videos):
            sample = random_sample(rng, num_frames, height, width)
            meta = {**sample["attrs"], "seed": sample["seed"], "prompt": sample["prompt"]}
            sink.write({"__key__": f"{index:08d}", "npy": to_uint8(sample["video"]), "json": meta, "txt": sample["prompt"]})
    manifest = {"generator": generator_fingerprint(), "num_videos": num_videos, "num_frames": num_frames,
                "height": height, "width": width, "seed": seed}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return shard_paths(out_dir)


def check_shards(shard_dir: str | Path, num_frames: int, height: int, width: int) -> None:
    """Raise if the shards in shard_dir come from another generator version or have another clip shape."""
    path = Path(shard_dir) / MANIFEST
    manifest = json.loads(path.read_text()) if path.exists() else {}
    expected = {"generator": generator_fingerprint(), "num_frames": num_frames, "height": height, "width": width}
    wrong = {k: manifest.get(k) for k, v in expected.items() if manifest.get(k) != v}
    if wrong:
        raise ValueError(
            f"the shards in {shard_dir} do not match this toy world: expected {expected}, the manifest has "
            f"{wrong if manifest else 'nothing (no ' + MANIFEST + ')'}; delete that folder to re-render it, or set "
            "data.shard_dir to another one"
        )


def shard_paths(shard_dir: str | Path) -> list[str]:
    return sorted(str(p) for p in Path(shard_dir).glob("toy-*.tar"))


def _collate(samples: list[dict]) -> dict:
    return {"video": torch.stack([s["video"] for s in samples]), "prompt": [s["prompt"] for s in samples]}


class ToyVideoDataModule(L.LightningDataModule):
    """source="shards": read (and, if absent, first write) webdataset shards; source="procedural": render on the fly.

    A positional stream (src/training/data.py): iteration i's batch is a function of (seed, i, global sample index)
    whatever the world size, so a resumed run reads what the straight run read. Shards are read by random access
    (every shard indexed and its clips' shape checked when the loader is built), draw n of the shard stream being
    video perm_e[n mod N] of a per-epoch permutation; procedural sample j of iteration i is rendered from
    derived_seed(seed, "toy_videos", i, j). `batch_size` is per rank (the global batch is batch_size x world size).

    A warm-up world comes first if warmup_batches > 0: iterations 0..warmup_batches-1 are `warmup_frames`-frame videos
    rendered with `warmup_attributes` held fixed (e.g. one colour, shape and background, so only the direction varies).
    A DiT trained on the full world from scratch never learns the direction word; one that learns it in a warm-up of
    short clips keeps it (experiments/teacher_toy). The shard stream starts at draw 0 after the warm-up.
    """

    def __init__(self, source: str = "shards", shard_dir: str = "data/toy_videos", num_videos: int = 8000,
                 num_frames: int = 21, height: int = 16, width: int = 16, batch_size: int = 16, num_workers: int = 0,
                 seed: int = 0, shuffle: bool = True, warmup_batches: int = 0, warmup_attributes: dict | None = None,
                 warmup_frames: int | None = None):
        super().__init__()
        if source not in ("shards", "procedural"):
            raise ValueError(f"source must be 'shards' or 'procedural', got {source!r}")
        if warmup_batches < 0:
            raise ValueError(f"warmup_batches must be >= 0, got {warmup_batches}")
        if warmup_frames is not None and not 1 <= warmup_frames <= num_frames:
            raise ValueError(f"warmup_frames must be in 1..num_frames ({num_frames}), got {warmup_frames}")
        warmup_attributes = dict(warmup_attributes) if warmup_attributes else None
        if warmup_batches and warmup_attributes:
            training_attributes(warmup_attributes)  # unknown or held-out-only attributes fail now
        self.save_hyperparameters()

    def prepare_data(self):
        hp = self.hparams
        if hp.source != "shards":
            return
        if shard_paths(hp.shard_dir):
            check_shards(hp.shard_dir, hp.num_frames, hp.height, hp.width)
        else:
            write_shards(hp.shard_dir, hp.num_videos, hp.num_frames, hp.height, hp.width, seed=hp.seed)

    def video_index(self) -> ShardIndex:
        hp = self.hparams
        urls = shard_paths(hp.shard_dir)
        if not urls:
            raise FileNotFoundError(f"no toy-*.tar shards in {hp.shard_dir}")
        return ShardIndex(urls, ("npy", "txt"), (hp.num_frames, 3, hp.height, hp.width))

    def train_dataloader(self):
        hp = self.hparams
        start, rank, world = run_position(self.trainer)
        global_batch = hp.batch_size * world
        videos = self.video_index() if hp.source == "shards" else None
        order = EpochOrder(len(videos), hp.seed, "toy_videos", hp.shuffle) if videos is not None else None

        def rendered(stream: str, iteration: int, j: int, frames: int, fixed: dict | None) -> dict:
            rng = np.random.default_rng(derived_seed(hp.seed, stream, iteration, j))
            return random_sample(rng, frames, hp.height, hp.width, fixed)

        def read(draw: int) -> dict:
            raw = videos.read(order(draw))
            return {"video": from_uint8(load_npy(raw["npy"])), "prompt": raw["txt"].decode()}

        def make_batch(iteration: int, positions: list[int]) -> dict:
            if iteration < hp.warmup_batches:
                frames = hp.warmup_frames or hp.num_frames
                return _collate([rendered("toy_warmup", iteration, j, frames, hp.warmup_attributes) for j in positions])
            if videos is None:
                return _collate([rendered("toy_videos", iteration, j, hp.num_frames, None) for j in positions])
            first = (iteration - hp.warmup_batches) * global_batch
            return _collate([read(first + j) for j in positions])

        return loader(PositionalStream(make_batch, rank_positions(hp.batch_size, rank, world), start), hp.num_workers)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description="Write toy-world training videos as webdataset shards.")
    parser.add_argument("--out", default="data/toy_videos")
    parser.add_argument("--num-videos", type=int, default=8000)
    parser.add_argument("--frames", type=int, default=21)
    parser.add_argument("--height", type=int, default=16)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--videos-per-shard", type=int, default=2000)
    args = parser.parse_args(argv)
    paths = write_shards(args.out, args.num_videos, args.frames, args.height, args.width, args.seed, args.videos_per_shard)
    print(json.dumps({"shards": len(paths), "out": args.out}))


if __name__ == "__main__":
    main()
