"""ODE init: the causal student, initialised from the base (teacher) weights, regressed onto teacher ODE trajectories.

Each block of a trajectory is put at its own randomly chosen saved noise level (hiar_method.md §7: CausVid /
Self-Forcing `ode_init.pt`); one block-causal forward predicts x0 for every block; the loss is the MSE to the
trajectory's clean end. The result, `ode_init.safetensors`, initialises the DMD stage's generator.

The levels are drawn per sample from (seed, iteration, global sample index) -- the stream tags each batch with its
iteration and its samples' indices (src/training/data.py) -- so a resumed run draws what the straight run drew. A
non-finite loss or gradient norm skips the step (src/training/guards.py NonFiniteGuard); the export refuses non-
finite weights.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import torch
import torch.nn.functional as F

from src.checkpoints import save_dit
from src.flow_matching import x0_from_velocity
from src.io import CHECKSUM_SUFFIX, clean_partial
from src.sampling.noise import derived_seed
from src.training.checkpoint_io import TASK_KEY, check_checkpoint_task, task_record
from src.training.distill import load_world_model
from src.training.guards import NonFiniteGuard, save_finite
from src.training.teacher import plain


class OdeInitTask(L.LightningModule):
    def __init__(self, world: dict, frames_per_block: int = 3, lr: float = 2e-6, betas=(0.9, 0.999),
                 weight_decay: float = 0.01, export_path: str | None = None, seed: int = 0,
                 max_consecutive_skips: int = 3):
        super().__init__()
        world = plain(world)
        self.save_hyperparameters({"world": world, "frames_per_block": frames_per_block, "lr": lr,
                                   "betas": [float(b) for b in betas], "weight_decay": weight_decay,
                                   "export_path": export_path, "seed": seed,
                                   "max_consecutive_skips": max_consecutive_skips,
                                   "model_config": plain(world["student"])})
        base = world.get("critic_init") or world.get("teacher_checkpoint")
        self.generator = load_world_model(world["student"], base, world.get("critic_init_which", "auto"))
        self.text_encoder = hydra.utils.instantiate(world["text_encoder"]).requires_grad_(False)
        self.guard = NonFiniteGuard(self, max_consecutive_skips)
        self.loss_finite = True
        self.exported: list[Path] | None = None  # the export's files, once written (export)

    def draw_levels(self, b: int, blocks: int, k: int, index: list[int] | None, iteration: int) -> torch.Tensor:
        """[B, blocks] saved-state index per block, each sample's from (seed, iteration, its global index)."""
        index = list(range(b)) if index is None else index
        rows = []
        for i in index:
            g = torch.Generator().manual_seed(derived_seed(self.hparams.seed, iteration, "ode_init_levels", i))
            rows.append(torch.randint(0, k - 1, (blocks,), generator=g))
        return torch.stack(rows)

    def regression_loss(self, trajectory: torch.Tensor, sigmas: torch.Tensor, prompts: list[str],
                        index: list[int] | None = None, iteration: int | None = None) -> torch.Tensor:
        """trajectory [B, K, F, C, h, w] with states at sigmas [K] (last = clean): per-block random level, x0 MSE.
        The levels are keyed by (seed, iteration (default: the optimizer step), global sample index)."""
        b, k, f = trajectory.shape[:3]
        fpb = self.hparams.frames_per_block
        if f % fpb:
            raise ValueError(f"trajectory has {f} frames, not a multiple of frames_per_block={fpb}")
        iteration = self.global_step if iteration is None else iteration
        levels = self.draw_levels(b, f // fpb, k, index, iteration).to(trajectory.device).repeat_interleave(fpb, dim=1)
        frames = torch.arange(f, device=trajectory.device)
        x = trajectory[torch.arange(b, device=trajectory.device)[:, None], levels, frames[None, :]]  # [B, F, C, h, w]
        t = 1000.0 * sigmas.to(trajectory.device)[levels].float()
        context, _ = self.text_encoder.encode(list(prompts))
        v = self.generator(x, t, context.to(x.device), frames_per_block=fpb)
        return F.mse_loss(x0_from_velocity(x, v, t).float(), trajectory[:, -1].float())

    def training_step(self, batch, batch_idx):
        index = batch["index"].tolist() if "index" in batch else None
        iteration = int(batch["iteration"]) if "iteration" in batch else None
        loss = self.regression_loss(batch["trajectory"], batch["sigmas"][0], batch["prompt"], index, iteration)
        self.loss_finite = bool(torch.isfinite(loss))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["prompt"]))
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        self.log("train/grad_norm", self.guard.before_step(self, self.generator.parameters()))

    def configure_optimizers(self):
        hp = self.hparams
        return torch.optim.AdamW(self.generator.parameters(), lr=hp.lr, betas=tuple(hp.betas),
                                 weight_decay=hp.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[TASK_KEY] = task_record(self, checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_checkpoint_task(self, checkpoint)

    def export_path(self) -> Path:
        return Path(self.hparams.export_path or Path(self.trainer.default_root_dir) / "ode_init.safetensors")

    def on_fit_start(self) -> None:
        if self.trainer.is_global_zero:
            clean_partial(self.export_path().parent)

    def on_train_end(self) -> None:
        self.export()

    def export(self) -> list[Path]:
        """The generator as safetensors with its checksum, refused if not finite or if every step was skipped. Once per
        process, from on_train_end or, after a resume that had nothing left to train, from src.train; returns the
        files the export holds (rank 0; [] elsewhere)."""
        if self.exported is None:
            self.guard.require_some_step(self, self.trainer.global_step)
            self.exported = []
            if self.trainer.is_global_zero:
                path = save_finite(self.export_path(), self.generator, lambda tmp: save_dit(self.generator, tmp))
                self.exported = [path, Path(str(path) + CHECKSUM_SUFFIX)]
        return self.exported
