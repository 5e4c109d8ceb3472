"""Every mistake a new user makes gets one short message before any work (src/schema.py): each bad command below exits
non-zero, names the key or the file, prints no traceback in a few lines, and leaves nothing under logs/ or
artifacts/ of a scratch project."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
import torch

from helpers import cli, save_tiny_teacher

# (id, module, arguments ({root} is the scratch project), what stderr must say)
BAD_INPUTS = [
    ("no stage", "src.train", [], "choose a stage: python -m src.train experiment=<"),
    ("unknown experiment", "src.train", ["experiment=hiar_fk"], "experiment/hiar_fk"),
    ("steps not a number", "src.train", ["experiment=hiar_fkl", "world.training.distill_steps=abc"],
     "error: world.training.distill_steps: expected a positive integer, got 'abc'"),
    ("steps -1 (no limit in Lightning)", "src.train", ["experiment=hiar_fkl", "world.training.distill_steps=-1"],
     "world.training.distill_steps: must be >= 1, got -1"),
    ("steps 0", "src.train", ["experiment=hiar_fkl", "world.training.distill_steps=0"],
     "world.training.distill_steps: must be >= 1, got 0"),
    ("ode init steps -1", "src.train", ["experiment=ode_init", "world.training.ode_init_steps=-1"],
     "world.training.ode_init_steps: must be >= 1, got -1"),
    ("pairs not a number", "src.train", ["experiment=ode_pairs", "world.training.num_ode_pairs=abc"],
     "world.training.num_ode_pairs: expected a positive integer, got 'abc'"),
    ("batch not a number", "src.train", ["experiment=ode_init", "world.training.batch_size=abc"],
     "world.training.batch_size: expected a positive integer, got 'abc'"),
    ("micro-batch does not divide", "src.train", ["experiment=ode_init", "world.training.micro_batch_size=3"],
     "world.training.micro_batch_size=3 does not divide"),
    ("fkl weight", "src.train", ["experiment=hiar_fkl", "fkl.weight=abc"], "task.fkl.weight: expected a number"),
    ("checkpoint interval 0", "src.train", ["experiment=ode_init", "callbacks.checkpoint.every_n_iterations=0"],
     "callbacks.checkpoint.every_n_iterations: must be >= 1"),
    ("workers -1", "src.train", ["experiment=ode_init", "data.num_workers=-1"], "data.num_workers: must be >= 0"),
    ("teacher max_steps", "src.train", ["experiment=teacher_toy", "trainer.max_steps=abc"],
     "trainer.max_steps: expected a positive integer, got 'abc'"),
    ("mode", "src.train", ["experiment=ode_init", "mode=train"], "mode: expected one of fit, predict, got 'train'"),
    ("sampler order", "src.train", ["experiment=hiar_fkl", "sampler.order=zigzag"], "sampler: unknown sampler order"),
    ("fresh clone: every missing stage", "src.train", ["experiment=hiar_fkl"],
     "1. ode_pairs (expected at {root}/artifacts/toy/ode_pairs): python -m src.train experiment=ode_pairs"),
    ("missing teacher file", "src.train", ["experiment=ode_pairs", "world.teacher_checkpoint={root}/nope.safetensors"],
     "{root}/nope.safetensors not found"),
    ("artifacts_dir not writable", "src.train", ["experiment=ode_pairs", "paths.artifacts_dir={root}/a_file/toy"],
     "paths.artifacts_dir: {root}/a_file/toy is not writable"),
    ("resume from a missing checkpoint", "src.train", ["experiment=ode_pairs", "ckpt_path={root}/last.ckpt"],
     "ckpt_path: {root}/last.ckpt not found"),
    ("empty prompt file", "src.train", ["experiment=ode_pairs", "world.training.prompts={root}/empty.txt"],
     "prompt file {root}/empty.txt holds no prompts"),
    ("Wan ode_pairs: every file it needs, only those", "src.train",
     ["experiment=ode_pairs", "world=wan2.1_1.3b", "world.paths.wan_root={root}/wan", "world.paths.teacher_root=/x14b",
      "world.training.prompts={root}/prompts.txt"],
     "5 Wan2.1 file(s) missing"),
    ("generate without a checkpoint", "src.generate", ["prompts=a red circle"], "checkpoint: required"),
    ("generate, checkpoint missing", "src.generate", ["checkpoint={root}/nope.safetensors", "prompts=a red circle"],
     "checkpoint: file not found: {root}/nope.safetensors"),
    ("generate, checkpoint empty", "src.generate", ["checkpoint={root}/empty.safetensors", "prompts=a red circle"],
     "{root}/empty.safetensors is empty"),
    ("generate without prompts", "src.generate", ["checkpoint={root}/teacher.safetensors"], "prompts: required"),
    ("generate, empty prompts", "src.generate", ["checkpoint={root}/teacher.safetensors", "prompts="],
     "prompts: expected a prompt, a .txt file or webdataset shards, got ''"),
    ("generate, prompt file missing", "src.generate", ["checkpoint={root}/teacher.safetensors", "prompts=nope.txt"],
     "prompts: prompt file not found: nope.txt"),
    ("generate, frames", "src.generate", ["checkpoint={root}/teacher.safetensors", "prompts=a", "num_frames=10"],
     "num_frames: 10 is not a multiple of the block size 3"),
    ("generate, dtype", "src.generate", ["checkpoint={root}/teacher.safetensors", "prompts=a", "dtype=float8"],
     "dtype: expected one of float32, bfloat16, float16, got 'float8'"),
    ("eval, videos folder missing", "evaluation.run", ["videos_dir={root}/videos"], "videos_dir: not found: {root}/videos"),
    ("eval, segments 0", "evaluation.run", ["segments=0"], "segments: must be >= 1, got 0"),
]
GPU_INPUTS = [
    ("trainer=gpu without CUDA", "src.train", ["experiment=ode_pairs", "trainer=gpu"],
     "trainer.accelerator: 'gpu' needs a CUDA device"),
    ("generate device=cuda without CUDA", "src.generate", ["checkpoint={root}/teacher.safetensors", "prompts=a",
                                                           "device=cuda"], "device: 'cuda' needs a CUDA device"),
    ("eval device=cuda without CUDA", "evaluation.run", ["device=cuda", "reference.prompts=1"],
     "device: 'cuda' needs a CUDA device"),
]
if not torch.cuda.is_available():
    BAD_INPUTS += GPU_INPUTS


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A scratch project root: a tiny teacher, an empty checkpoint, an empty prompt file, a file where a folder goes."""
    root = tmp_path_factory.mktemp("project")
    save_tiny_teacher(root / "teacher.safetensors")
    (root / "empty.safetensors").touch()
    (root / "empty.txt").write_text("\n \n")
    (root / "prompts.txt").write_text("a cat\n")
    (root / "a_file").write_text("not a folder")
    return root


def leftovers(root: Path) -> list[Path]:
    return [p for folder in ("logs", "artifacts") for p in (root / folder).rglob("*") if p.is_file()]


@pytest.mark.parametrize("module, args, says", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_a_bad_input_is_refused_in_one_line(project, module, args, says):
    teacher = [f"world.teacher_checkpoint={project}/teacher.safetensors"] if module == "src.train" else []
    args = [a.format(root=project) for a in [*teacher, *args]]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    rc, out, err = cli(["-m", module, *args], project, project, check=False, env={"HYDRA_FULL_ERROR": "0"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    assert rc != 0, out[-2000:]
    assert says.format(root=project) in err, err[-2000:]
    assert "Traceback" not in out + err, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len([line for line in lines if not line[0].isspace()]) <= 4 and len(lines) <= 16, err  # lists indented
    assert not leftovers(project), leftovers(project)
    # CPU time, not wall time (a loaded machine stretches the latter): importing torch and Lightning is ~5 s of it, the
    # checks well under one; building a model or reading data would show here
    assert cpu_seconds < 30, cpu_seconds


def test_wan_ode_pairs_asks_only_for_what_it_reads(project):
    """The ODE pairs read the text encoder and the ODE teacher (the 1.3B base): never the 14B teacher or the VAE."""
    args = ["experiment=ode_pairs", "world=wan2.1_1.3b", f"world.paths.wan_root={project}/wan",
            "world.paths.teacher_root=/x14b", f"world.training.prompts={project}/prompts.txt"]
    rc, _, err = cli(["-m", "src.train", *args], project, project, check=False, env={"HYDRA_FULL_ERROR": "0"})
    assert rc != 0
    for name in ("text encoder", "tokenizer config", "tokenizer:", "ODE teacher DiT config", "ODE teacher DiT weights"):
        assert name in err, err
    assert "/x14b" not in err and "VAE" not in err, err


def test_full_error_shows_the_traceback_and_still_leaves_nothing(project):
    rc, _, err = cli(["-m", "src.train", "experiment=hiar_fkl", "world.training.distill_steps=abc"], project, project,
                     check=False, env={"HYDRA_FULL_ERROR": "1"})
    assert rc != 0 and "Traceback" in err and "world.training.distill_steps" in err
    assert not leftovers(project)
