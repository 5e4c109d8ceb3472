"""The bidirectional teacher: a WanDiT trained by flow matching (v = noise - x0) on a world's videos.

Text is dropped to the world's negative prompt for a fraction of samples so the teacher supports classifier-free
guidance. Each sample's draws (text dropout, noise level, noise) come from (seed, iteration, its global index), the
iteration's clip length from (seed, iteration): the stream tags each batch with both (src/worlds/toy/data.py), so a
resumed run trains on exactly what the straight run would have. EMA weights come from Lightning's `EMAWeightAveraging`
callback (conf/experiment/teacher_toy.yaml), which keeps both weight sets in the checkpoint and so resumes exactly; its
checkpoints' `state_dict` holds the EMA weights. `export_teacher` writes those as a safetensors file with the model
config in the metadata; `load_teacher` reads it.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from src.checkpoints import load_dit, save_dit
from src.flow_matching import NUM_TRAIN_TIMESTEPS, add_noise, shift_sigma
from src.models.wan import WanConfig, WanDiT
from src.sampling.noise import derived_seed
from src.training.checkpoint_io import TASK_KEY, check_checkpoint_task, task_record
from src.training.guards import NonFiniteGuard, save_finite


def plain(node) -> dict:
    """Hydra nodes -> plain containers (torch>=2.6 weights_only checkpoint loading rejects OmegaConf objects)."""
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node)


def model_config(node: dict) -> WanConfig:
    return WanConfig.from_dict({k: v for k, v in node.items() if k != "_target_"})


class TeacherTask(L.LightningModule):
    def __init__(
        self,
        model: dict,
        text_encoder: dict,
        codec: dict,
        negative_prompt: str = "",
        lr: float = 5e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int = 100,
        min_lr_ratio: float = 1.0,
        text_dropout: float = 0.1,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        timestep_shift: float = 1.0,
        clip_frames: list[int] | None = None,
        max_consecutive_skips: int = 3,
        seed: int = 0,
        init_weights: str | None = None,
    ):
        super().__init__()
        model, text_encoder, codec = plain(model), plain(text_encoder), plain(codec)
        if not 0 <= text_dropout < 1:
            raise ValueError(f"text_dropout must be in [0, 1), got {text_dropout}")
        self.save_hyperparameters(
            {"model": model, "text_encoder": text_encoder, "codec": codec, "negative_prompt": negative_prompt,
             "lr": lr, "weight_decay": weight_decay, "betas": list(betas), "warmup_steps": warmup_steps,
             "min_lr_ratio": min_lr_ratio,
             "text_dropout": text_dropout, "logit_mean": logit_mean, "logit_std": logit_std,
             "timestep_shift": timestep_shift,
             "clip_frames": list(clip_frames) if clip_frames else None,
             "max_consecutive_skips": max_consecutive_skips, "seed": seed, "init_weights": init_weights}
        )
        self.model = WanDiT(model_config(model))
        if init_weights:  # continue from an earlier teacher (e.g. one from an earlier version of the world)
            self.model.load_state_dict(load_dit(init_weights, config=self.model.cfg).state_dict())
        self.text_encoder = hydra.utils.instantiate(text_encoder)
        self.codec = hydra.utils.instantiate(codec)
        self.guard = NonFiniteGuard(self, max_consecutive_skips)
        self.loss_finite = True

    def timesteps(self, normal: torch.Tensor) -> torch.Tensor:
        """Logit-normal noise levels (SD3) from standard-normal draws, then shifted as the sampler's grid is:
        sigma = shift(sigmoid(mean + std * normal)).

        The shift should match the sampler's: high noise levels are where the prompt decides the motion, and a shifted
        sampler spends most of its steps there.
        """
        normal = normal * self.hparams.logit_std + self.hparams.logit_mean
        return shift_sigma(torch.sigmoid(normal), self.hparams.timestep_shift) * NUM_TRAIN_TIMESTEPS

    def flow_matching_loss(self, pixels: torch.Tensor, prompts: list[str], iteration: int,
                           index: list[int] | None = None) -> torch.Tensor:
        """Every draw keyed by (seed, iteration[, global sample index]) (index None: 0..B-1), never by process RNG
        state, so a resumed run or another world size draws what the straight run drew."""
        hp = self.hparams
        index = range(len(prompts)) if index is None else index
        if hp.clip_frames:  # a random clip length per iteration (the same on every rank), always from frame 0
            g = torch.Generator().manual_seed(derived_seed(hp.seed, iteration, "teacher_clip"))
            pixels = pixels[:, : hp.clip_frames[int(torch.randint(len(hp.clip_frames), (), generator=g))]]
        x0 = self.codec.encode(pixels)
        drops, normals, noises = [], [], []
        for i in index:
            g = torch.Generator().manual_seed(derived_seed(hp.seed, iteration, "teacher", i))
            drops.append(bool(torch.rand((), generator=g) < hp.text_dropout))
            normals.append(torch.randn((), generator=g))
            noises.append(torch.randn(x0.shape[1:], generator=g))
        prompts = [hp.negative_prompt if d else p for p, d in zip(prompts, drops)]
        context, _ = self.text_encoder.encode(prompts)
        t = self.timesteps(torch.stack(normals)).to(x0.device)
        noise = torch.stack(noises).to(device=x0.device, dtype=x0.dtype)
        velocity = self.model(add_noise(x0, noise, t), t, context)
        return F.mse_loss(velocity.float(), (noise - x0).float())

    def training_step(self, batch, batch_idx):
        loss = self.flow_matching_loss(batch["video"], batch["prompt"], int(batch["iteration"]),
                                       batch["index"].tolist())
        self.loss_finite = bool(torch.isfinite(loss))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["prompt"]))
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """A non-finite loss or gradient norm skips the step (src/training/guards.py NonFiniteGuard)."""
        self.guard.before_step(self, self.model.parameters())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[TASK_KEY] = task_record(self, checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_checkpoint_task(self, checkpoint)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, betas=hp.betas)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else None
        if hp.min_lr_ratio < 1 and total is None:
            raise ValueError("task.min_lr_ratio < 1 decays the lr over trainer.max_steps, which is not set")
        factor = functools.partial(lr_factor, warmup_steps=hp.warmup_steps, total_steps=total,
                                   min_lr_ratio=hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def lr_factor(step: int, warmup_steps: int, total_steps: int | None, min_lr_ratio: float) -> float:
    """Linear warm-up, then constant (min_lr_ratio 1) or a cosine from 1 to min_lr_ratio at total_steps: annealing
    the lr at the end is what settles a teacher whose quality still moves with the last batches."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if min_lr_ratio >= 1:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def export_teacher(checkpoint_path: str | Path, out_path: str | Path) -> Path:
    """Lightning checkpoint (EMA weights in its state_dict) -> safetensors with {"config": WanConfig json} metadata."""
    return save_teacher(load_dit(checkpoint_path), out_path)


def save_teacher(model: WanDiT, out_path: str | Path) -> Path:
    """Atomically, with a checksum; refused if a weight is not finite."""
    return save_finite(out_path, model, lambda tmp: save_dit(model, tmp))


def load_teacher(path: str | Path, device: str | torch.device = "cpu") -> WanDiT:
    """A frozen WanDiT in eval mode from a TeacherTask `.ckpt` (its EMA weights) or any checkpoint `load_dit` reads."""
    return load_dit(path, device=device).eval().requires_grad_(False)
