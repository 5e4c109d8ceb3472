"""The checks every entry point runs on its composed config before any work: types, ranges, writable outputs and
readable input files; every error names the key or the file (``InputError``)."""

from __future__ import annotations

import os
from pathlib import Path

from src.io import InputError
from src.training.checkpoint_io import check_file
from src.training.data import prompt_list


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
TASK_SCHEMAS = {"student": DISTILL_SCHEMA, "ode_init": ODE_INIT_SCHEMA, "ode_pairs": ODE_PAIRS_SCHEMA,
                "teacher": TEACHER_SCHEMA}  # by the `stage` an experiment declares
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
    stage = cfg.get("stage")
    for dotted, (kind, low, high, low_open) in TASK_SCHEMAS.get(stage, {}).items():
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
        if path:
            if key == "generator_init" and not Path(path).exists():
                raise InputError(f"task.generator_init: file not found: {path} (run the ode_init stage first, or set "
                                 "task.generator_init=null to start from the base weights)")
            check_model_file(path, f"task.{key}")
    if cfg.get("ckpt_path"):
        ckpt = Path(cfg["ckpt_path"])
        if not ckpt.is_dir():
            check_model_file(ckpt, "ckpt_path")
    prompts = _get(cfg, "data.prompts") or (_get(cfg, "data.source") if stage == "ode_pairs" else None)
    if prompts:
        try:
            prompt_list(prompts, 1)
        except InputError as e:
            raise InputError(f"data: {e}") from None
