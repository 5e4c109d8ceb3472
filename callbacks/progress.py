"""A training progress bar that counts iterations (batches) against the run's total, with an ETA.

Lightning's bar counts the batches of an epoch; our streams are endless (one epoch lasts the whole run),
and `trainer.max_steps` counts *optimizer* steps, of which a distillation iteration takes 1 or 2 (a critic step
every iteration, a generator step every `gen_update_ratio`-th). The bar's total is the number of iterations that
reach max_steps, and it runs across epochs.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar


def iterations_for(max_steps: int, pl_module: L.LightningModule, accumulate: int = 1) -> int:
    """Iterations (batches) a run of `max_steps` optimizer steps takes."""
    ratio = getattr(pl_module, "hparams", {}).get("gen_update_ratio") if not pl_module.automatic_optimization else None
    if ratio:  # iteration i steps the critic, and the generator too when i % ratio == 0
        n = math.floor(max_steps * ratio / (ratio + 1))
        while n + math.ceil(n / ratio) < max_steps:
            n += 1
        return n
    return max_steps * accumulate


def resumed_iterations(trainer: L.Trainer, pl_module: L.LightningModule) -> int:
    """Iterations done before this fit started: the module's iteration counter (restored from the checkpoint), else
    the optimizer steps restored into the trainer."""
    counter = getattr(pl_module, "iteration", None)
    if isinstance(counter, torch.Tensor):
        return int(counter)
    return trainer.global_step * trainer.accumulate_grad_batches


class IterationProgressBar(TQDMProgressBar):
    def __init__(self, refresh_rate: int = 10, process_position: int = 0):
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=True)
        self._iterations = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._iterations = resumed_iterations(trainer, pl_module)  # a resumed run (ckpt_path=) counts on from there
        max_steps = trainer.max_steps
        if trainer.fast_dev_run:
            total = int(trainer.fast_dev_run)
        elif max_steps and max_steps > 0:
            total = iterations_for(max_steps, pl_module, trainer.accumulate_grad_batches)
        else:
            total = None
        self.train_progress_bar.reset(total=total)
        self.train_progress_bar.n = self._iterations
        self.train_progress_bar.set_description("train (iterations)")

    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        pass  # one bar for the whole run, not one per epoch

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self._iterations += 1
        bar = self.train_progress_bar
        if bar is not None and self._should_update(self._iterations, bar.total):
            bar.n = self._iterations
            bar.refresh()
            bar.set_postfix({"step": trainer.global_step, **self.get_metrics(trainer, pl_module)})

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
