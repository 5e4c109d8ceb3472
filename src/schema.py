"""The checks every entry point runs on its composed config before any work: types, ranges, choices, writable outputs
and readable input files, against the tables below; every error names the key or the file (``InputError``).

An entry point runs its checks inside ``refusals(cfg)``: a refusal prints one short ``error: <key>: <why>`` on stderr
(the traceback only under HYDRA_FULL_ERROR=1), exits with status 2 and removes the run folder Hydra made for it, so a
refused command leaves nothing under logs/ or artifacts/.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from src.io import InputError
from src.training.checkpoint_io import check_file
from src.training.data import prompt_list

REFUSED = 2  # the exit status of a refusal (argparse's)
MISSING = "???"


def _number(value, key: str, kind: type, low=None, high=None, low_open=False) -> None:
    ok_types = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types):
        what = ("a positive integer" if low == 1 else "an integer") if kind is int else "a number"
        raise InputError(f"{key}: expected {what}, got {value!r} ({type(value).__name__})")
    if low is not None and (value <= low if low_open else value < low):
        raise InputError(f"{key}: must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise InputError(f"{key}: must be <= {high}, got {value}")


# key -> (type, low, high, low_open); a None (or ???) value is skipped: where a key must be set, its consumer says so
DISTILL_SCHEMA = {
    "num_frames": (int, 1, None, False), "gen_update_ratio": (int, 1, None, False), "min_exit_step": (int, 0, None, False),
    "seed": (int, 0, None, False), "grad_accumulation": (int, 1, None, False),
    "dmd.guidance": (float, 0, None, False), "dmd.shift": (float, 0, None, True), "dmd.t_min": (float, 0, 1000, False),
    "dmd.t_max": (float, 0, 1000, False), "dmd.score_shift": (float, 0, None, True),
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
# the weight files each stage reads (task-relative keys); a Wan world's are checked all at once first (wan_stage_files)
TASK_FILE_KEYS = {"student": ("generator_init", "world.teacher_checkpoint", "world.critic_init"),
                  "ode_init": ("world.critic_init",), "ode_pairs": ("world.ode_teacher_checkpoint",),
                  "teacher": ("init_weights",)}
# the rest of a training config (full keys)
TRAIN_SCHEMA = {
    "seed": (int, 0, None, False),
    "world.frames_per_block": (int, 1, None, False),
    "world.training.num_ode_pairs": (int, 1, None, False), "world.training.ode_guidance": (float, 0, None, False),
    "world.training.batch_size": (int, 1, None, False), "world.training.micro_batch_size": (int, 1, None, False),
    "world.training.ode_init_steps": (int, 1, None, False), "world.training.lr_ode_init": (float, 0, None, True),
    "world.training.gen_update_ratio": (int, 1, None, False), "world.training.lr_generator": (float, 0, None, True),
    "world.training.lr_critic": (float, 0, None, True), "world.training.ema_start": (int, 0, None, False),
    "world.training.distill_steps": (int, 1, None, False),
    "world.training.drift_every_n_steps": (int, 1, None, False),
    "ode_pairs.num_frames": (int, 1, None, False), "ode_pairs.num_steps": (int, 1, None, False),
    "ode_pairs.shift": (float, 0, None, True), "ode_pairs.guidance": (float, 0, None, False),
    "ode_pairs.num_prompts": (int, 1, None, False), "ode_pairs.seed": (int, 0, None, False),
    "data.batch_size": (int, 1, None, False), "data.num_workers": (int, 0, None, False),
    "data.pairs_per_shard": (int, 1, None, False), "data.num_prompts": (int, 1, None, False),
    "data.num_videos": (int, 1, None, False), "data.num_frames": (int, 1, None, False),
    "data.seed": (int, 0, None, False),
    "trainer.log_every_n_steps": (int, 1, None, False), "trainer.num_nodes": (int, 1, None, False),
    "trainer.gradient_clip_val": (float, 0, None, False),
    "callbacks.checkpoint.every_n_iterations": (int, 1, None, False),
    "callbacks.checkpoint.save_top_k": (int, -1, None, False),
    "callbacks.progress.refresh_rate": (int, 0, None, False),
    "callbacks.drift.every_n_steps": (int, 1, None, False), "callbacks.drift.num_frames": (int, 1, None, False),
    "callbacks.drift.segments": (int, 1, None, False),
}
TRAIN_CHOICES = {
    "mode": ("fit", "predict"),
    "publish": (True, False),
    "trainer.accelerator": ("auto", "cpu", "gpu", "cuda", "mps"),
    "trainer.precision": ("32-true", "32", 32, "bf16-mixed", "bf16-true", "bf16", "16-mixed", "16-true", "16", 16,
                          "64-true", "64", 64),
}
GENERATE_SCHEMA = {"num_frames": (int, 1, None, False), "seed": (int, 0, None, False),
                   "max_prompts": (int, 1, None, False), "switch_every": (int, 1, None, False)}
GENERATE_CHOICES = {"which": ("auto", "generator", "generator_ema", "critic"),
                    "dtype": ("float32", "bfloat16", "float16"), "compile": (True, False)}
EVAL_SCHEMA = {"segments": (int, 1, None, False), "fps": (float, 0, None, True),
               "generate.num_frames": (int, 1, None, False), "generate.seed": (int, 0, None, False),
               "reference.prompts": (int, 1, None, False), "reference.duration_s": (float, 0, None, True)}
EVAL_CHOICES = {"oracle": ("auto", True, False), "reference.enabled": ("auto", True, False),
                "vbench.enabled": (True, False), "vbench.long": ("auto", True, False)}


def _get(node: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def check_table(plain: dict, table: dict, prefix: str = "") -> None:
    for dotted, (kind, low, high, low_open) in table.items():
        value = _get(plain, dotted)
        if value is not None and value != MISSING:
            _number(value, f"{prefix}{dotted}", kind, low, high, low_open)


def check_choices(plain: dict, choices: dict) -> None:
    for dotted, allowed in choices.items():
        value = _get(plain, dotted)
        if value is not None and value not in allowed:
            raise InputError(f"{dotted}: expected one of {', '.join(map(str, allowed))}, got {value!r}")


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


def check_device(value, key: str) -> None:
    """A CUDA device (trainer=gpu, device=cuda) on a machine without one is refused before anything is built."""
    if str(value).split(":")[0] in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InputError(f"{key}: {value!r} needs a CUDA device and this machine has none (use the CPU: "
                             f"{'trainer=cpu' if key.startswith('trainer') else key + '=cpu'})")


def check_sampler(plain: dict) -> None:
    from src.sampling.orders import SamplerConfig

    sampler = plain.get("sampler")
    if isinstance(sampler, dict):
        try:
            SamplerConfig(**{k: v for k, v in sampler.items() if not k.startswith("_")})
        except (TypeError, ValueError) as e:
            raise InputError(f"sampler: {e}") from None


def is_wan(world: dict | DictConfig | None) -> bool:
    return str(_get(dict(world or {}), "codec._target_") or "").startswith("src.worlds.wan")


def check_wan_files(world: dict, stage: str) -> None:
    """Every Wan2.1 file the stage reads, missing ones in one error (src/worlds/wan/paths.py)."""
    from src.worlds.wan.paths import check_files, stage_files

    try:
        check_files(stage_files(OmegaConf.create(world), stage))
    except FileNotFoundError as e:
        raise InputError(str(e)) from None


WAN_STAGES = {"student": "distill", "ode_init": "ode_init", "ode_pairs": "ode_pairs"}


def validate_config(cfg: dict) -> None:
    """Types and ranges of the task config, writable outputs, readable inputs; before anything is built. `cfg` is the
    resolved config as plain containers."""
    task = cfg.get("task") or {}
    stage = cfg.get("stage")
    check_table(task, TASK_SCHEMAS.get(stage, {}), "task.")
    for key, folder in (("task.export_dir", task.get("export_dir")),
                        ("task.export_path", task.get("export_path") and Path(task["export_path"]).parent),
                        ("trainer.default_root_dir", _get(cfg, "trainer.default_root_dir")),
                        ("callbacks.checkpoint.dirpath", _get(cfg, "callbacks.checkpoint.dirpath"))):
        if folder:
            check_writable(folder, key)
    if stage in WAN_STAGES and is_wan(task.get("world")):
        check_wan_files(task["world"], WAN_STAGES[stage])
    for key in TASK_FILE_KEYS.get(stage, ()):
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


# ------------------------------------------------------------------------------------------- entry points


def resolved(cfg: DictConfig, table: dict) -> dict:
    """The config as plain containers, every interpolation resolved (an error names the key); ??? stays ???. The
    table's values are checked as given first, so a bad value is named before a resolver that reads it fails."""
    given = OmegaConf.to_container(cfg, resolve=False)
    check_table(given, {k: v for k, v in table.items() if not str(_get(given, k)).startswith("${")})
    plain = OmegaConf.to_container(cfg, resolve=True)
    check_table(plain, table)
    return plain


def check_train(cfg: DictConfig, stages: list[str]) -> None:
    """`python -m src.train`: a stage is chosen, every value is in range, the stage's inputs exist (listed together,
    in chain order, with their commands), every output folder is writable, every input file reads."""
    if cfg.get("task") is None:
        raise InputError(f"choose a stage: python -m src.train experiment=<{'|'.join(stages)}>")
    plain = resolved(cfg, TRAIN_SCHEMA)
    check_choices(plain, TRAIN_CHOICES)
    if plain.get("mode") == "fit":
        max_steps = _get(plain, "trainer.max_steps")
        _number(max_steps, "trainer.max_steps", int, 1)  # -1 would be Lightning's "no limit"
    check_sampler(plain)
    check_device(_get(plain, "trainer.accelerator"), "trainer.accelerator")
    task = plain["task"]
    check_table(task, TASK_SCHEMAS.get(plain.get("stage"), {}), "task.")
    from src import artifacts

    artifacts.check_missing_inputs(cfg)
    validate_config(plain)
    if artifacts.stage_of(cfg) is not None and plain.get("publish", True):
        check_writable(_get(plain, "paths.artifacts_dir"), "paths.artifacts_dir")


def check_generate(cfg: DictConfig) -> list[str]:
    """`python -m src.generate`: a readable checkpoint, prompts (never empty), frame counts, choices, the device, the
    world's files; returns the prompts."""
    for key, example in (("checkpoint", "checkpoint=artifacts/toy/hiar_fkl/student.safetensors"),
                         ("prompts", "prompts='a red circle moving left on a black background'")):
        if OmegaConf.is_missing(cfg, key):
            raise InputError(f"{key}: required, e.g. {example}")
    plain = resolved(cfg, GENERATE_SCHEMA)
    check_choices(plain, GENERATE_CHOICES)
    check_sampler(plain)
    fpb = int(_get(plain, "sampler.frames_per_block"))
    if plain["num_frames"] % fpb:
        raise InputError(f"num_frames: {plain['num_frames']} is not a multiple of the block size {fpb} "
                         "(sampler.frames_per_block)")
    upscale = plain.get("upscale")
    if upscale != "auto":
        _number(upscale, "upscale", int, 1)
    check_device(plain.get("device"), "device")
    checkpoint = str(plain["checkpoint"])
    if not checkpoint.strip():
        raise InputError("checkpoint: empty")
    if not Path(checkpoint).exists():
        raise InputError(f"checkpoint: file not found: {checkpoint} (a relative path is read from the current "
                         f"folder, {Path.cwd()})")
    check_model_file(checkpoint, "checkpoint")
    if is_wan(plain.get("world")):
        check_wan_files(plain["world"], "generate")
    check_writable(plain["output_dir"], "output_dir")
    from src.api import parse_schedule
    from src.io import load_prompts

    spec = plain["prompts"]
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"prompts: expected a prompt, a .txt file or webdataset shards, got {spec!r}")
    try:
        prompts = load_prompts(spec, plain.get("max_prompts"))
        for prompt in prompts:
            parse_schedule(prompt, plain.get("switch_every"), plain["num_frames"], fpb)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"prompts: {e}") from None
    return prompts


def check_eval(cfg: DictConfig) -> None:
    """`python -m evaluation.run`: values, choices, the device, the video folder, the prompts file, the methods'
    checkpoints and a writable output folder."""
    plain = resolved(cfg, EVAL_SCHEMA)
    check_choices(plain, EVAL_CHOICES)
    check_device(plain.get("device"), "device")
    for key in ("videos_dir", "prompts_file"):
        path = plain.get(key)
        if path is not None and not Path(path).exists():
            raise InputError(f"{key}: not found: {path}")
    for method, spec in (_get(plain, "generate.methods") or {}).items():
        checkpoint = (spec or {}).get("checkpoint")
        if not checkpoint:
            raise InputError(f"generate.methods.{method}.checkpoint: required")
        if not Path(checkpoint).exists():
            raise InputError(f"generate.methods.{method}.checkpoint: file not found: {checkpoint}")
    if plain.get("weights_dir") and not Path(plain["weights_dir"]).is_dir():
        raise InputError(f"weights_dir: not a folder: {plain['weights_dir']}")
    check_writable(plain["out_dir"], "out_dir")


# ------------------------------------------------------------------------------------------- refusals


def describe(err: BaseException) -> str:
    """One short message for a refusal, naming the key."""
    if isinstance(err, OmegaConfBaseException):
        key = getattr(err, "full_key", None) or "config"
        text = str(getattr(err, "msg", "") or err).splitlines()[0]
        missing = re.search(r"Missing mandatory value: (\S+)", text)
        if missing:
            name = missing.group(1)
            via = "" if name == key else f" (read by {key})"
            return f"{name}: no value given (???){via}: set it, e.g. {name}=<value>"
        return f"{key}: {re.sub(r'^[A-Za-z]+ raised while resolving interpolation: ', '', text)}"
    return str(err)


def remove_run_folder(cfg: DictConfig | None) -> None:
    """The run folder Hydra made for a refused command, when it holds only Hydra's files, and the folders above it
    that are left empty, up to paths.log_dir (a folder given again to resume keeps everything)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    run = Path(HydraConfig.get().runtime.output_dir)
    if not run.is_dir() or any(p.name != ".hydra" and p.suffix != ".log" for p in run.iterdir()):
        return
    try:
        stop = Path(str(OmegaConf.select(cfg, "paths.log_dir"))).resolve() if cfg is not None else None
    except OmegaConfBaseException:
        stop = None
    stop = stop or Path(os.environ.get("HIAR_ROOT", run.anchor)).resolve()
    shutil.rmtree(run, ignore_errors=True)
    folder = run.resolve().parent
    while folder != stop and stop in folder.parents and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


@contextlib.contextmanager
def refusals(cfg: DictConfig | None = None):
    """Errors raised inside are refusals: `error: <message>` on stderr, no run folder left, exit status 2. With
    HYDRA_FULL_ERROR=1 the error is raised as it is (its traceback), after the run folder is removed."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 -- inside the checks, any failure is a refusal of the command
        remove_run_folder(cfg)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {describe(err)}", file=sys.stderr, flush=True)
        raise SystemExit(REFUSED) from None
