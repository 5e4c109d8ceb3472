"""Checkpoints that never silently lose or corrupt work.

* ``AtomicCheckpointIO``: Lightning checkpoints written through src/io.py (temporary name in the destination folder,
  fsync, rename, a ``.sha256`` beside), refused if any tensor is non-finite; read back only with weights_only=True
  after the size and checksum are checked -- also for ``trainer.fit(ckpt_path=...)``.
* ``IterationCheckpoint``: checkpoint intervals counted in iterations (a distillation generator iteration takes two
  optimizer steps), temporaries of killed writers removed at start.
* ``check_checkpoint_task``: a checkpoint resumes only the task class and model groups it was written by.
* ``resume_path``: a resume from a ``last.ckpt`` that is not there (its link not yet written) takes the newest periodic
  checkpoint beside it, and says so.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from src.io import CHECKSUM_SUFFIX, ChecksumError, InputError, atomic_write, clean_partial, verify_checksum
from src.training.guards import completed_iterations, require_finite

log = logging.getLogger(__name__)
LAST = "last.ckpt"


def check_file(path: str | Path, what: str) -> None:
    """A weight file exists, is non-empty, matches its `.sha256` (if any) and its header reads (safetensors, or a torch
    zip archive; .json is taken as is). `what` names it in every error: "checkpoint", "task.world.teacher_checkpoint:"."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} not found")
    if path.stat().st_size == 0:
        raise InputError(f"{what} {path} is empty (0 bytes): a write was interrupted? Use an earlier one")
    try:
        verify_checksum(path)
    except ChecksumError as e:
        raise InputError(f"{what} {e}") from None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 -- the loader's message, with the file
            raise InputError(f"{what} {path} is not a readable safetensors file: {e}") from None
    elif path.suffix != ".json" and not zipfile.is_zipfile(path):
        raise InputError(f"{what} {path} is not a torch checkpoint (no zip archive: truncated or another format)")


def read_checkpoint(path: str | Path, map_location=None) -> dict:
    """A Lightning / torch checkpoint, checked (check_file) then read with weights_only=True; errors name the file."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"checkpoint {path} is a folder (a DeepSpeed checkpoint needs its strategy)")
    check_file(path, "checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unpickling failure becomes one error naming the file
        raise InputError(f"checkpoint {path} cannot be read with weights_only=True: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None


def resume_path(ckpt_path: str | None) -> str | None:
    """``ckpt_path``, or, when it names a ``last.ckpt`` that does not exist (a kill before its link was written, or a
    link whose target is gone) and periodic checkpoints lie beside it, the newest of those (by write time)."""
    if not ckpt_path or Path(str(ckpt_path)).exists() or Path(str(ckpt_path)).name != LAST:
        return ckpt_path
    folder = Path(str(ckpt_path)).parent
    periodic = [p for p in folder.glob("*.ckpt") if p.name != LAST and p.exists()]
    if not periodic:
        return ckpt_path
    newest = max(periodic, key=lambda p: (p.stat().st_mtime_ns, p.name))
    log.warning("%s not found: resuming from the newest periodic checkpoint in %s, %s", ckpt_path, folder, newest.name)
    return str(newest)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO through src/io.py: atomic, checksummed, finite-only writes; weights_only reads."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        # weights, optimizer moments and callback states (the EMA weights); not ModelCheckpoint's bookkeeping, whose
        # "worst score so far" starts at inf
        weights = {k: v for k, v in checkpoint.items() if k != "callbacks"}
        weights["callbacks"] = {k: v for k, v in checkpoint.get("callbacks", {}).items() if "Checkpoint" not in k}
        require_finite(weights, f"checkpoint {path}")
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp), checksum=True)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict:
        return read_checkpoint(path, map_location)  # weights_only is always True, whatever the caller asks

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        Path(str(path) + CHECKSUM_SUFFIX).unlink(missing_ok=True)


class IterationCheckpoint(ModelCheckpoint):
    """ModelCheckpoint every `every_n_iterations` iterations (and at the last one), named by iteration; removes the
    temporaries of killed writers from its folder at start."""

    def __init__(self, every_n_iterations: int = 200, filename: str = "iteration-{iteration:06d}", **kwargs):
        if every_n_iterations < 1:
            raise ValueError(f"every_n_iterations must be >= 1, got {every_n_iterations}")
        kwargs.setdefault("auto_insert_metric_name", False)
        super().__init__(filename=filename, every_n_train_steps=0, **kwargs)
        self.every_n_iterations = every_n_iterations

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath:
            clean_partial(self.dirpath)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        iteration = completed_iterations(trainer, pl_module)
        last = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        if (iteration % self.every_n_iterations and not last) or self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        candidates["iteration"] = torch.tensor(iteration)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)


TASK_KEY = "hiar_task"


def task_record(module: L.LightningModule, state_dict: dict) -> dict:
    return {"class": f"{type(module).__module__}.{type(module).__qualname__}",
            "groups": sorted({k.split(".", 1)[0] for k in state_dict})}


def check_checkpoint_task(module: L.LightningModule, checkpoint: dict, optional: Iterable[str] = ()) -> None:
    """The checkpoint must come from this task class with these model groups and their tensors' shapes."""
    record = checkpoint.get(TASK_KEY)
    ours = task_record(module, module.state_dict())
    if record is None:
        raise InputError(f"the checkpoint has no task record ('{TASK_KEY}'): it was not written by this project's "
                         f"{ours['class']}")
    if record["class"] != ours["class"]:
        raise InputError(f"the checkpoint is from task {record['class']}, this run is {ours['class']}: resume a "
                         "checkpoint of the same stage")
    state = checkpoint["state_dict"]
    expected = {k: v for k, v in module.state_dict().items() if k.split(".", 1)[0] in record["groups"]}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - {k for k in state if k.split(".", 1)[0] in optional})
    shapes = [k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)]
    absent_groups = sorted(set(ours["groups"]) - set(record["groups"]) - set(optional) - set(module_unsaved(module)))
    problems = []
    if absent_groups:
        problems.append(f"model groups {absent_groups} absent (it has {record['groups']})")
    if missing:
        problems.append(f"{len(missing)} tensors missing, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors, e.g. {unexpected[:3]}")
    if shapes:
        problems.append("shapes differ: " + ", ".join(f"{k} {list(state[k].shape)} vs {list(expected[k].shape)}"
                                                      for k in sorted(shapes)[:3]))
    if problems:
        raise InputError(f"the checkpoint does not fit this {ours['class'].rsplit('.', 1)[-1]}: " + "; ".join(problems))


def module_unsaved(module) -> tuple[str, ...]:
    """Groups a task leaves out of its checkpoints (the frozen teacher, parameter-free helpers)."""
    return tuple(getattr(module, "unsaved_groups", ()))
