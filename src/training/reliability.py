"""Training that never silently loses or corrupts work (issue 18).

* `AtomicCheckpointIO`: Lightning checkpoints written through src/io.py (temporary name in the destination folder,
  fsync, rename, a `.sha256` beside), refused if any tensor is non-finite; read back only with weights_only=True after
  the size and checksum are checked -- also for `trainer.fit(ckpt_path=...)`.
* `IterationCheckpoint`: checkpoint intervals counted in iterations (a distillation generator iteration takes two
  optimizer steps), temporaries of killed writers removed at start.
* `check_checkpoint_task`: a checkpoint resumes only the task class and model groups it was written by.
* `NonFiniteGuard`: a non-finite loss or gradient norm skips the optimizer step (counted, logged); K skips in a row
  stop the run naming the iteration and the last good checkpoint.
* `save_finite`: every export refuses non-finite tensors and is written atomically with a checksum.
* `validate_config` / `check_inputs`: config types and ranges, writable outputs and readable input files, checked
  before any model is built; every error names the key or the file.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from src.io import CHECKSUM_SUFFIX, ChecksumError, atomic_write, clean_partial, verify_checksum
from src.training.streams import InputError, read_prompt_file


class NonFiniteError(FloatingPointError):
    pass


# --------------------------------------------------------------------------------------------- finite tensors


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


# --------------------------------------------------------------------------------------------- checkpoints


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


def completed_iterations(trainer, module) -> int:
    counter = getattr(module, "iteration", None)
    return int(counter) if isinstance(counter, torch.Tensor) else trainer.global_step


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


def last_good_checkpoint(trainer) -> str:
    callback = getattr(trainer, "checkpoint_callback", None)
    path = callback and (callback.best_model_path or callback.last_model_path)  # the named file, not last.ckpt
    return path or "none written yet"


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


# --------------------------------------------------------------------------------------------- non-finite guard


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


# --------------------------------------------------------------------------------------------- inputs


def _number(value, key: str, kind: type, low=None, high=None, low_open=False) -> None:
    ok_types = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types):
        raise InputError(f"{key}: expected {'an integer' if kind is int else 'a number'}, got {value!r} "
                         f"({type(value).__name__})")
    if low is not None and (value <= low if low_open else value < low):
        raise InputError(f"{key}: must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise InputError(f"{key}: must be <= {high}, got {value}")


# key -> (type, low, high, low_open); a None value is allowed only where the code accepts None (not listed here)
DISTILL_SCHEMA = {
    "num_frames": (int, 1, None, False), "gen_update_ratio": (int, 1, None, False), "min_exit_step": (int, 0, None, False),
    "seed": (int, 0, None, False), "grad_accumulation": (int, 1, None, False),
    "dmd.guidance": (float, 0, None, False), "dmd.shift": (float, 0, None, True), "dmd.t_min": (float, 0, 1000, False),
    "dmd.t_max": (float, 0, 1000, False),
    "fkl.weight": (float, 0, None, False), "fkl.num_steps": (int, 1, 4, False),
    "optim.lr_generator": (float, 0, None, True), "optim.lr_critic": (float, 0, None, True),
    "optim.weight_decay": (float, 0, None, False), "optim.grad_clip": (float, 0, None, True),
    "ema.decay": (float, 0, 1, False), "ema.start": (int, 0, None, False),
    "nonfinite.max_consecutive_skips": (int, 1, None, False), "nonfinite.dmd_max_fraction": (float, 0, 1, False),
}
ODE_INIT_SCHEMA = {"frames_per_block": (int, 1, None, False), "lr": (float, 0, None, True),
                   "weight_decay": (float, 0, None, False), "seed": (int, 0, None, False),
                   "max_consecutive_skips": (int, 1, None, False)}
ODE_PAIRS_SCHEMA = {"num_frames": (int, 1, None, False), "num_steps": (int, 1, None, False),
                    "shift": (float, 0, None, True), "guidance": (float, 0, None, False), "seed": (int, 0, None, False),
                    "batch_size": (int, 1, None, False)}
TEACHER_SCHEMA = {"lr": (float, 0, None, True), "weight_decay": (float, 0, None, False),
                  "warmup_steps": (int, 0, None, False), "min_lr_ratio": (float, 0, 1, False),
                  "text_dropout": (float, 0, 1, False),
                  "logit_std": (float, 0, None, True), "timestep_shift": (float, 0, None, True),
                  "seed": (int, 0, None, False), "max_consecutive_skips": (int, 1, None, False)}
TASK_SCHEMAS = {"DistillTask": DISTILL_SCHEMA, "OdeInitTask": ODE_INIT_SCHEMA, "OdePairsTask": ODE_PAIRS_SCHEMA,
                "TeacherTask": TEACHER_SCHEMA}
TASK_FILE_KEYS = {"generator_init": "model", "world.teacher_checkpoint": "model", "world.critic_init": "model",
                  "init_weights": "model"}


def _get(node: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def check_writable(folder: str | Path, key: str) -> None:
    """`folder` (created later if absent) can be written: its nearest existing ancestor is a writable folder."""
    path = Path(folder).resolve()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        why = "not a folder" if not probe.is_dir() else "read-only"
        raise InputError(f"{key}: {folder} is not writable ({probe} is {why})")


def check_model_file(path: str | Path, key: str) -> None:
    """A weight file given by config key `key` (check_file); release folders are checked by their loader."""
    if not Path(path).is_dir():
        check_file(path, f"{key}:")


def validate_config(cfg: dict) -> None:
    """Types and ranges of the task config, writable outputs, readable inputs; before anything is built. `cfg` is the
    resolved config as plain containers."""
    task = cfg.get("task") or {}
    name = str(task.get("_target_", "")).rsplit(".", 1)[-1]
    for dotted, (kind, low, high, low_open) in TASK_SCHEMAS.get(name, {}).items():
        value = _get(task, dotted)
        if value is not None:
            _number(value, f"task.{dotted}", kind, low, high, low_open)
    for key, folder in (("task.export_dir", task.get("export_dir")),
                        ("task.export_path", task.get("export_path") and Path(task["export_path"]).parent),
                        ("trainer.default_root_dir", _get(cfg, "trainer.default_root_dir")),
                        ("callbacks.checkpoint.dirpath", _get(cfg, "callbacks.checkpoint.dirpath"))):
        if folder:
            check_writable(folder, key)
    for key in TASK_FILE_KEYS:
        path = _get(task, key)
        if path and name in ("DistillTask", "OdeInitTask", "OdePairsTask", "TeacherTask"):
            if key == "generator_init" and not Path(path).exists():
                raise InputError(f"task.generator_init: file not found: {path} (run the ode_init stage first, or set "
                                 "task.generator_init=null to start from the base weights)")
            check_model_file(path, f"task.{key}")
    if cfg.get("ckpt_path"):
        ckpt = Path(cfg["ckpt_path"])
        if not ckpt.is_dir():
            check_model_file(ckpt, "ckpt_path")
    data_target = str(_get(cfg, "data._target_") or "")
    prompts = _get(cfg, "data.prompts") or (_get(cfg, "data.source") if "PromptChunks" in data_target else None)
    if prompts and prompts != "toy":
        try:
            read_prompt_file(prompts)
        except InputError as e:
            raise InputError(f"data: {e}") from None
