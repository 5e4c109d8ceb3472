"""Non-finite numbers never reach an optimizer step or a saved file.

* ``NonFiniteGuard``: a non-finite loss or gradient norm skips the optimizer step (counted, logged); K skips in a row
  stop the run naming the iteration and the last good checkpoint.
* ``save_finite``: every export refuses non-finite tensors and is written atomically with a checksum.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch

from src.io import atomic_write


class NonFiniteError(FloatingPointError):
    pass


def nonfinite_entries(obj: Any, prefix: str = "") -> Iterable[tuple[str, int]]:
    """(key path, #non-finite elements) of every floating tensor in a nested dict/list that holds any."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            bad = int((~torch.isfinite(obj)).sum())
            if bad:
                yield prefix or "<tensor>", bad
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from nonfinite_entries(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from nonfinite_entries(v, f"{prefix}[{i}]")


def require_finite(obj: Any, what: str) -> None:
    bad = list(nonfinite_entries(obj))
    if bad:
        listed = ", ".join(f"{k} ({n})" for k, n in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteError(f"refusing to write {what}: non-finite values in {listed}")


def save_finite(path: str | Path, state: Any, write: Callable[[Path], None]) -> Path:
    """Checks `state` (a module, state dict or nested container) is finite, then writes `path` atomically through
    `write(tmp)` with a `.sha256` beside it."""
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    require_finite(state, str(path))
    return atomic_write(path, write, checksum=True)


def completed_iterations(trainer, module) -> int:
    counter = getattr(module, "iteration", None)
    return int(counter) if isinstance(counter, torch.Tensor) else trainer.global_step


def last_good_checkpoint(trainer) -> str:
    callback = getattr(trainer, "checkpoint_callback", None)
    path = callback and (callback.best_model_path or callback.last_model_path)  # the named file, not last.ckpt
    return path or "none written yet"


class NonFiniteGuard:
    """Skips optimizer steps whose loss or gradient norm is not finite; after `max_consecutive` skips in a row of one
    optimizer the run stops with an error naming the iteration and the last good checkpoint. Counts live in the
    module's buffers `nonfinite_skips` (all) and `consecutive_skips` (one per optimizer), so they are checkpointed."""

    def __init__(self, module: L.LightningModule, max_consecutive: int, names: tuple[str, ...] = ("update",)):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1, got {max_consecutive}")
        self.max_consecutive, self.names = max_consecutive, names
        module.register_buffer("nonfinite_skips", torch.zeros((), dtype=torch.long))
        module.register_buffer("consecutive_skips", torch.zeros(len(names), dtype=torch.long))

    @staticmethod
    def grad_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
        grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.zeros(())

    def step_allowed(self, module: L.LightningModule, loss_finite: bool, grad_norm: torch.Tensor,
                     name: str = "update") -> bool:
        """True: take the step. False: the step is skipped and counted (the caller drops the gradients). All ranks
        decide together (a non-finite loss on one rank skips the step everywhere)."""
        finite = bool(loss_finite) and bool(torch.isfinite(grad_norm))
        trainer = module._trainer
        if trainer is not None:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        slot = self.names.index(name)
        if finite:
            module.consecutive_skips[slot] = 0
            return True
        module.nonfinite_skips += 1
        module.consecutive_skips[slot] += 1
        iteration = completed_iterations(trainer, module) if trainer is not None else -1
        if int(module.consecutive_skips[slot]) >= self.max_consecutive:
            last = last_good_checkpoint(trainer) if trainer is not None else "none"
            raise NonFiniteError(
                f"{int(module.consecutive_skips[slot])} optimizer steps in a row had a non-finite loss or gradient "
                f"norm ({name} update, last at iteration {iteration}); stopping. Last good checkpoint: {last}. "
                "Nothing was exported.")
        return False

    def require_some_step(self, module: L.LightningModule, attempted: int, name: str = "update") -> None:
        """Before an export: a run in which every one of its `attempted` `name` updates was skipped trained nothing,
        and its initial weights are no result. (`consecutive_skips` is checkpointed, so a resume counts the whole run.)"""
        skipped = int(module.consecutive_skips[self.names.index(name)])
        if attempted > 0 and skipped >= attempted:
            raise NonFiniteError(f"every {name} update of this run ({attempted}) was skipped as non-finite: the weights "
                                 "are still their initialisation. Nothing was exported.")

    def before_step(self, module: L.LightningModule, params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
        """A LightningModule's `on_before_optimizer_step` under automatic optimisation (the module sets `loss_finite`
        in its training step): drops the gradients of a skipped step, logs the skip count; returns the gradient norm."""
        params = list(params)
        grad_norm = self.grad_norm(params)
        if not self.step_allowed(module, module.loss_finite, grad_norm):
            drop_gradients(params)
        module.log("train/nonfinite_skips", module.nonfinite_skips.float())
        return grad_norm


def drop_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """With no .grad, AdamW leaves a parameter and its state untouched: the step becomes a no-op."""
    for p in params:
        p.grad = None
