"""ODE init: the causal student, initialised from the base (teacher) weights, regressed onto teacher ODE trajectories.

Each block of a trajectory is put at its own randomly chosen saved noise level (hiar_method.md §7: CausVid /
Self-Forcing `ode_init.pt`); one block-causal forward predicts x0 for every block; the loss is the MSE to the
trajectory's clean end. The result, `ode_init.safetensors`, initialises the DMD stage's generator.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import torch
import torch.nn.functional as F

from src.checkpoints import save_dit
from src.schedule import x0_from_velocity
from src.training.distill import load_world_model
from src.training.teacher import plain


class OdeInitTask(L.LightningModule):
    def __init__(self, world: dict, frames_per_block: int = 3, lr: float = 2e-6, betas=(0.9, 0.999),
                 weight_decay: float = 0.01, export_path: str | None = None):
        super().__init__()
        world = plain(world)
        self.save_hyperparameters({"world": world, "frames_per_block": frames_per_block, "lr": lr,
                                   "betas": [float(b) for b in betas], "weight_decay": weight_decay,
                                   "export_path": export_path,
                                   "model_config": plain(world["student"])})
        base = world.get("critic_init") or world.get("teacher_checkpoint")
        self.generator = load_world_model(world["student"], base, world.get("critic_init_which", "auto"))
        self.text_encoder = hydra.utils.instantiate(world["text_encoder"]).requires_grad_(False)

    def regression_loss(self, trajectory: torch.Tensor, sigmas: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """trajectory [B, K, F, C, h, w] with states at sigmas [K] (last = clean): per-block random level, x0 MSE."""
        b, k, f = trajectory.shape[:3]
        fpb = self.hparams.frames_per_block
        if f % fpb:
            raise ValueError(f"trajectory has {f} frames, not a multiple of frames_per_block={fpb}")
        levels = torch.randint(0, k - 1, (b, f // fpb), device=trajectory.device).repeat_interleave(fpb, dim=1)
        frames = torch.arange(f, device=trajectory.device)
        x = trajectory[torch.arange(b, device=trajectory.device)[:, None], levels, frames[None, :]]  # [B, F, C, h, w]
        t = 1000.0 * sigmas.to(trajectory.device)[levels].float()
        context, _ = self.text_encoder.encode(list(prompts))
        v = self.generator(x, t, context.to(x.device), frames_per_block=fpb)
        return F.mse_loss(x0_from_velocity(x, v, t).float(), trajectory[:, -1].float())

    def training_step(self, batch, batch_idx):
        loss = self.regression_loss(batch["trajectory"], batch["sigmas"][0], batch["prompt"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["prompt"]))
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        return torch.optim.AdamW(self.generator.parameters(), lr=hp.lr, betas=tuple(hp.betas),
                                 weight_decay=hp.weight_decay)

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            path = self.hparams.export_path or Path(self.trainer.default_root_dir) / "ode_init.safetensors"
            save_dit(self.generator, path)
