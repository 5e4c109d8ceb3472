"""Builders the tests share: tiny model configs and worlds, a random tiny teacher file, the CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from src.checkpoints import save_dit
from src.models.wan import WanConfig, WanDiT

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
TOY_PROMPTS = "src.worlds.toy.shapes.training_prompts"  # the toy world's procedural prompt source

# a tiny DiT for model and sampler tests (4-channel latents)
TINY = dict(dim=64, ffn_dim=128, freq_dim=32, num_heads=4, num_layers=2, in_dim=4, out_dim=4, text_len=8, text_dim=16)
# the tiny toy-world DiT of the training tests (12-channel toy latents, toy text encoder of width 16)
TINY_MODEL = dict(dim=32, ffn_dim=64, freq_dim=32, num_heads=2, num_layers=1, in_dim=12, out_dim=12, text_len=8,
                  text_dim=16, patch_size=[1, 2, 2])
# attention geometries of the model tests: (frames_per_block, window, sink)
ATTENTION_MODES = [
    (None, None, 0),  # bidirectional
    (3, None, 0),  # block-causal
    (3, 6, 0),
    (3, 6, 3),  # rolling window with sink frames (two key ranges per late block)
    (3, 9, 2),
]
SAMPLER = dict(order="step_first", steps=[1000, 750, 500, 250], warp=True, shift=5.0, frames_per_block=3, window=21,
               sink=0, context_level="next", renoise=True, context_noise=0.0, hybrid_steps=2)


def model_inputs(frames=12, batch=2, seed=1):
    """Seeded (x, t, context) for a TINY DiT: latents [B, F, 4, 4, 6], per-frame timesteps, an 8-token context."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames, 4, 4, 6, generator=g)
    t = torch.rand(batch, frames, generator=g) * 1000
    ctx = torch.randn(batch, 8, 16, generator=g)
    return x, t, ctx


def distill_task(teacher_file, order="step_first", **kw):
    """A DistillTask of the tiny world (9 frames, lr 1e-3, EMA from iteration 2; the rest conf/task/distill.yaml's)."""
    from src.training.distill import DistillTask

    return DistillTask(world=tiny_world(teacher_file), sampler={**SAMPLER, "order": order}, num_frames=9,
                       optim={"lr_generator": 1e-3, "lr_critic": 1e-3}, ema={"decay": 0.9, "start": 2}, **kw)


TEACHER_TASK_MODEL = {"_target_": "src.models.wan.WanConfig", "dim": 32, "ffn_dim": 64, "freq_dim": 32, "num_heads": 2,
                      "num_layers": 1, "in_dim": 12, "out_dim": 12, "text_len": 16, "text_dim": 64,
                      "patch_size": [1, 2, 2]}


def tiny_teacher_task(model: dict | None = None, **kwargs):
    """A TeacherTask of a one-layer toy-world DiT (``model`` overrides its config), the toy text encoder and codec."""
    from src.training.teacher import TeacherTask

    return TeacherTask(model={**TEACHER_TASK_MODEL, **(model or {})},
                       codec={"_target_": "src.worlds.toy.codec.ToyCodec", "factor": 2},
                       text_encoder={"_target_": "src.worlds.toy.text.ToyTextEncoder", "text_len": 16, "text_dim": 64,
                                     "seed": 0}, **kwargs)


def save_tiny_teacher(path: Path, seed: int = 0) -> Path:
    """A random TINY_MODEL DiT saved as safetensors (the teacher and base weights of a tiny world)."""
    torch.manual_seed(seed)
    save_dit(WanDiT(WanConfig(**TINY_MODEL)), path)
    return path


def tiny_world(teacher_file) -> dict:
    """The `world` node of a tiny toy world (latents 12 x 4 x 4) whose three models are TINY_MODEL."""
    return {
        "name": "toy", "frames_per_block": 3, "latent": {"channels": 12, "height": 4, "width": 4},
        "student": TINY_MODEL, "critic": TINY_MODEL, "teacher": TINY_MODEL,
        "teacher_checkpoint": str(teacher_file), "critic_init": str(teacher_file), "negative_prompt": "",
        "text_encoder": {"_target_": "src.worlds.toy.text.ToyTextEncoder", "text_len": 8, "text_dim": 16, "seed": 0},
        "codec": {"_target_": "src.worlds.toy.codec.ToyCodec", "factor": 2},
    }


def distill_batch(n=2):
    """A distillation batch of the tiny world: random 9-frame trajectories, their sigmas and prompts."""
    trajectory = torch.randn(n, 5, 9, 12, 4, 4)
    sigmas = torch.tensor([[1.0, 0.96, 8 / 9, 8 / 11, 0.0]] * n)
    return {"trajectory": trajectory, "sigmas": sigmas, "prompt": ["a red circle moving left on a gray background"] * n}


class DistillBatches(torch.utils.data.IterableDataset):
    """Endless seeded distill_batch()es."""

    def __iter__(self):
        torch.manual_seed(0)
        while True:
            yield distill_batch()


# ------------------------------------------------------------------------------------------- the CLI

STUDENT = ["task.num_frames=9"]
PAIRS = ["data.pairs_per_shard=2"]


def tiny_world_overrides(teacher: Path) -> list[str]:
    """Hydra overrides that shrink the toy world's models and stages (no path among them but the teacher)."""
    model = [f"world.{m}.{k}={v}" for m in ("teacher", "student", "critic") for k, v in TINY_MODEL.items()
             if k != "patch_size"]
    return [*model, f"world.teacher_checkpoint={teacher}", "world.text_encoder.text_len=8",
            "world.text_encoder.text_dim=16", "world.training.num_ode_pairs=4", "world.training.batch_size=2",
            "world.training.ode_init_steps=2", "world.training.distill_steps=2", "ode_pairs.num_steps=4",
            "ode_pairs.save_indices=[0,1,2,3,4]", "ode_pairs.num_frames=9"]


def cli(args: list[str], root: Path, cwd: Path, check: bool = True, wait: bool = True, env: dict | None = None):
    """`python <args>` with the project root $HIAR_ROOT=root, run from cwd; (returncode, stdout, stderr)."""
    env = {**os.environ, "HIAR_ROOT": str(root), "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "WANDB_MODE": "disabled", **(env or {})}
    proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=600)
    if check:
        assert proc.returncode == 0, err[-3000:]
    return proc.returncode, out, err


def project_with_pairs(root: Path, cwd: Path) -> list[str]:
    """A project root (HIAR_ROOT) with a random tiny teacher and ODE pairs published by the CLI run from `cwd`;
    returns the tiny world's overrides."""
    tiny = tiny_world_overrides(save_tiny_teacher(root / "teacher.safetensors"))
    cli(["-m", "src.train", "experiment=ode_pairs", *tiny, *PAIRS], root, cwd)
    return tiny
