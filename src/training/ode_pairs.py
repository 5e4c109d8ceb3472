"""Teacher ODE trajectories ("ODE pairs") as webdataset shards (read back by src/training/data.py).

Writing (`python -m src.train experiment=ode_pairs`, `trainer.predict`): the prompt set is cut into chunks of
`pairs_per_shard`; each chunk becomes one shard `ode-<chunk>.tar`, written atomically with its `.sha256`. A chunk whose
shard and checksum exist is skipped, so an interrupted run resumes (and writes the bytes the straight run wrote), and
under DDP each rank takes its own chunks (Lightning's distributed sampler). Each trajectory is the world's
`ode_teacher`'s Euler ODE (48 steps, shift 8, CFG u + 6 (c - u)) from noise drawn from `seed` and the prompt's index, so
a resumed or re-sharded run writes the same data. The ODE teacher is the bidirectional base model, as officially (the
Wan world: Wan2.1-T2V-1.3B in fp32; the 14B is only the DMD teacher). `manifest.json` in the shard folder records what
made the shards (the ODE teacher's sha256, the ODE settings); a run whose settings differ from an existing manifest
stops before writing anything.

A sample: `<key>.npy` float32 [K, F, C, h, w] (states at `save_indices`, the last one clean), `<key>.json`
{"prompt", "sigmas", "indices"}.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import torch
import webdataset as wds
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from src.flow_matching import euler_grid
from src.io import CHECKSUM_SUFFIX, atomic_path, atomic_write_text, clean_partial, sha256_file, write_checksum
from src.sampling.noise import derived_seed
from src.sampling.ode import sample_ode
from src.training.data import prompt_list
from src.training.distill import load_world_model
from src.training.teacher import plain

SHARD_PATTERN = "ode-{:06d}.tar"
MANIFEST = "manifest.json"


def shard_complete(shard: Path) -> bool:
    """A shard counts as written once its checksum is beside it (written after the shard's atomic rename)."""
    return shard.is_file() and Path(str(shard) + CHECKSUM_SUFFIX).is_file()


class PromptChunks(Dataset):
    """The chunks of the prompt set whose shards are not written yet."""

    def __init__(self, prompts: list[str], pairs_per_shard: int, shard_dir: str | Path):
        self.prompts, self.size = prompts, pairs_per_shard
        total = (len(prompts) + pairs_per_shard - 1) // pairs_per_shard
        self.chunks = [c for c in range(total) if not shard_complete(Path(shard_dir) / SHARD_PATTERN.format(c))]

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, i):
        chunk = self.chunks[i]
        indices = list(range(chunk * self.size, min((chunk + 1) * self.size, len(self.prompts))))
        return {"chunk": chunk, "indices": indices, "prompts": [self.prompts[j] for j in indices]}


class PromptChunksDataModule(L.LightningDataModule):
    def __init__(self, source: str, num_prompts: int, pairs_per_shard: int, shard_dir: str, seed: int = 0):
        super().__init__()
        self.source, self.num_prompts, self.pairs_per_shard = source, num_prompts, pairs_per_shard
        self.shard_dir, self.seed = shard_dir, seed

    def predict_dataloader(self):
        chunks = PromptChunks(prompt_list(self.source, self.num_prompts, self.seed), self.pairs_per_shard,
                              self.shard_dir)
        return DataLoader(chunks, batch_size=None, shuffle=False)


def weights_sha256(source: str | Path) -> str:
    """sha256 of a checkpoint's bytes: a file, or a folder's weight and config files (name and digest of each)."""
    path = Path(source)
    if path.is_file():
        return sha256_file(path)
    if (path / "transformer").is_dir():  # root of a -Diffusers release: only the DiT
        path = path / "transformer"
    files = sorted(p for p in path.iterdir() if p.is_file() and (p.suffix == ".safetensors" or p.name.endswith(".json")))
    if not files:
        raise FileNotFoundError(f"{path}: no weights (*.safetensors) or config (*.json) files to fingerprint")
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


class OdePairsTask(L.LightningModule):
    """The frozen bidirectional ODE teacher (`world.ode_teacher`) producing trajectories in `predict_step`."""

    def __init__(self, world: dict, num_frames: int = 21, num_steps: int = 48, shift: float = 8.0,
                 guidance: float = 6.0, save_indices=(0, 12, 24, 36, 48), seed: int = 0, batch_size: int = 8):
        super().__init__()
        world = plain(world)
        if sorted(save_indices) != list(save_indices) or save_indices[-1] != num_steps:
            raise ValueError(f"save_indices must ascend and end at num_steps={num_steps}, got {list(save_indices)}")
        self.save_hyperparameters({"world": world, "num_frames": num_frames, "num_steps": num_steps, "shift": shift,
                                   "guidance": guidance, "save_indices": list(save_indices), "seed": seed,
                                   "batch_size": batch_size})
        # a world without an ode_teacher entry (hand-built in tests) uses its teacher, as the toy world does
        checkpoint = world.get("ode_teacher_checkpoint") or world.get("teacher_checkpoint")
        if not checkpoint:
            raise ValueError("world.ode_teacher_checkpoint is not set: the ODE pairs need the weights of the ODE teacher")
        model = world.get("ode_teacher") or world["teacher"]
        self.teacher = load_world_model(model, checkpoint).eval().requires_grad_(False)
        self.text_encoder = hydra.utils.instantiate(world["text_encoder"]).requires_grad_(False)
        latent = world["latent"]
        self.latent_shape = (num_frames, latent["channels"], latent["height"], latent["width"])
        self.teacher_source = str(checkpoint)
        self._teacher_sha256: str | None = None

    def manifest(self) -> dict:
        """What makes these shards: the ODE teacher (its weights' sha256 and config) and the ODE settings."""
        if self._teacher_sha256 is None:
            self._teacher_sha256 = weights_sha256(self.teacher_source)
        hp = self.hparams
        return {"ode_teacher": {"checkpoint": self.teacher_source, "sha256": self._teacher_sha256,
                                "config": self.teacher.cfg.to_dict(), "dtype": str(next(self.teacher.parameters()).dtype)},
                "num_frames": hp.num_frames, "latent_shape": list(self.latent_shape[1:]), "num_steps": hp.num_steps,
                "shift": hp.shift, "guidance": hp.guidance, "save_indices": list(hp.save_indices), "seed": hp.seed,
                "negative_prompt": hp.world.get("negative_prompt", "")}

    def initial_noise(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derived_seed(self.hparams.seed, "ode_pairs", index))
        return torch.randn(self.latent_shape, generator=g)

    @torch.no_grad()
    def predict_step(self, batch, batch_idx):
        hp = self.hparams
        negative = hp.world.get("negative_prompt", "")
        states = []
        for start in range(0, len(batch["prompts"]), hp.batch_size):
            prompts = batch["prompts"][start : start + hp.batch_size]
            indices = batch["indices"][start : start + hp.batch_size]
            cond, _ = self.text_encoder.encode(prompts)
            uncond, _ = self.text_encoder.encode([negative] * len(prompts))
            noise = torch.stack([self.initial_noise(i) for i in indices]).to(self.device)
            _, saved = sample_ode(self.teacher, cond.to(self.device), noise=noise, uncond_context=uncond.to(self.device),
                                  num_steps=hp.num_steps, shift=hp.shift, guidance_scale=hp.guidance,
                                  return_states_at=hp.save_indices)
            chunk_states = torch.stack([saved[i] for i in hp.save_indices], dim=1)
            bad = [i for i, s in zip(indices, chunk_states) if not torch.isfinite(s).all()]
            if bad:  # never write a non-finite trajectory
                raise FloatingPointError(f"the ODE teacher produced non-finite states for prompt indices {bad}")
            states.append(chunk_states)
        sigmas = (euler_grid(hp.num_steps, hp.shift)[hp.save_indices] / 1000.0).tolist()
        return {"chunk": batch["chunk"], "indices": batch["indices"], "prompts": batch["prompts"],
                "states": torch.cat(states).cpu(), "sigmas": sigmas}


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class PairShardWriter(BasePredictionWriter):
    """Writes each predicted chunk as one shard through src.io (a temporary name in the shard folder, fsync, rename,
    then its checksum), so a crash leaves no half shard."""

    def __init__(self, shard_dir: str):
        super().__init__(write_interval="batch")
        self.shard_dir = Path(shard_dir)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.is_global_zero:
            clean_partial(self.shard_dir)

    def on_predict_start(self, trainer, pl_module) -> None:
        """Write the manifest (rank 0), or refuse to add shards to a folder made by another teacher or setting."""
        manifest = pl_module.manifest()
        path = self.shard_dir / MANIFEST
        if path.exists():
            found = json.loads(path.read_text())
            same = {k: v for k, v in manifest.items() if k != "ode_teacher"}
            differs = sorted(k for k, v in same.items() if found.get(k) != v)
            if found.get("ode_teacher", {}).get("sha256") != manifest["ode_teacher"]["sha256"]:
                differs.insert(0, "ode_teacher.sha256")
            if differs:
                raise ValueError(f"{path}: the shards in {self.shard_dir} were made with other settings "
                                 f"({', '.join(differs)}); delete that folder or point paths.artifacts_dir elsewhere")
        elif trainer.is_global_zero:
            self.shard_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(manifest, indent=1))

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        final = self.shard_dir / SHARD_PATTERN.format(prediction["chunk"])
        # mtime 0: the same chunk gives the same bytes, so a rebuilt shard matches its checksum and its manifest
        with atomic_path(final) as partial, wds.TarWriter(str(partial), mtime=0) as sink:
            for index, prompt, states in zip(prediction["indices"], prediction["prompts"], prediction["states"]):
                meta = {"prompt": prompt, "sigmas": prediction["sigmas"],
                        "indices": pl_module.hparams.save_indices}
                sink.write({"__key__": f"{index:08d}", "npy": _npy_bytes(states.numpy().astype(np.float32)),
                            "json": json.dumps(meta).encode()})
        write_checksum(final)
