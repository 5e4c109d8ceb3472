"""Distributed DMD on CPU: 2 processes (gloo) under `ddp` and `deepspeed_zero2` give the losses of 1 process with the
same global batch; every rank draws the same exit steps; a ZeRO-2 checkpoint resumes to the same next loss.

Each 2-process run is `torchrun --nproc_per_node=2` on this file (127.0.0.1, a free port). The global batch
(world.training.batch_size semantics) holds 4 different prompts, split by `batch_plan` with micro-batches of 1: each
rank gets 2 contiguous samples in 2 accumulated micro-batches. The 1-process references run in this process: batch 4
in one forward, and batch 4 in 4 accumulated micro-batches.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from src.distributed.config import batch_plan
from src.training.distill import DistillTask

from helpers import ROOT, SAMPLER, tiny_world

PROMPTS = ["a red circle moving left on a gray background", "a blue square moving up on a black background",
           "a green triangle moving right on a white background", "a yellow circle moving down on a gray background"]
GLOBAL_BATCH = len(PROMPTS)
ITERATIONS = 3
GEN_RATIO = 2  # iterations 0 and 2 update the generator: 5 optimizer steps
STEPS = sum(1 + (i % GEN_RATIO == 0) for i in range(ITERATIONS))
RTOL = 1e-4  # relative, on every logged loss (float32); measured: at most 2.3e-5 (the tiny DMD loss), resume exact
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def global_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    return {"trajectory": torch.randn(GLOBAL_BATCH, 5, 6, 12, 4, 4, generator=g),
            "sigmas": torch.tensor([[1.0, 0.96, 8 / 9, 8 / 11, 0.0]] * GLOBAL_BATCH), "prompt": list(PROMPTS)}


class RankBatches(torch.utils.data.IterableDataset):
    """The same global batch every iteration; this rank's share of it as DistillTask.positions numbers samples:
    micro-batch m of rank r holds global samples (m * world + r) * micro ... + micro - 1."""

    def __init__(self, rank: int, world: int, micro: int = 1):
        self.rank, self.world, self.micro = rank, world, micro

    def __iter__(self):
        b, n = global_batch(), batch_plan(GLOBAL_BATCH, self.world)["rank_batch_size"]
        first = [(m * self.world + self.rank) * self.micro for m in range(n // self.micro)]
        index = [i for f in first for i in range(f, f + self.micro)]
        while True:
            yield {k: [v[i] for i in index] if isinstance(v, list) else v[index] for k, v in b.items()}


class Record(L.Callback):
    """Per iteration: the logged (rank-averaged) losses, and this rank's exit-step draws."""

    def __init__(self):
        self.losses, self.exit_steps = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.exit_steps.append([module.draw_exit_step("generator"), module.draw_exit_step("critic")])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append({k: float(v) for k, v in trainer.callback_metrics.items() if k != "train/exit_step"})


def make_task(teacher: str, grad_accumulation: int = 1) -> DistillTask:
    return DistillTask(world=tiny_world(teacher), sampler=SAMPLER, num_frames=6, gen_update_ratio=GEN_RATIO,
                       optim={"lr_generator": 1e-3, "lr_critic": 1e-3}, ema={"decay": 0.9, "start": 1},
                       grad_accumulation=grad_accumulation)


def fit(teacher: str, root: Path, strategy=None, grad_accumulation: int = 1, rank: int = 0, world: int = 1,
        max_steps: int = STEPS, ckpt_path: str | None = None, save_after: int | None = None) -> Record:
    torch.manual_seed(0)
    task, record = make_task(teacher, grad_accumulation), Record()
    callbacks = [record]
    if save_after is not None:
        callbacks.append(SaveAfter(save_after, str(root / "resume.ckpt")))
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strategy or "auto", max_steps=max_steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, callbacks=callbacks)
    trainer.fit(task, torch.utils.data.DataLoader(RankBatches(rank, world), batch_size=None), ckpt_path=ckpt_path)
    return record


class SaveAfter(L.Callback):
    """Saves after each of iterations 1..`iteration` to one path: each save replaces the previous (a folder under
    DeepSpeed, written beside it and renamed into place)."""

    def __init__(self, iteration: int, path: str):
        self.iteration, self.path = iteration, path

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if int(module.iteration) <= self.iteration:
            trainer.save_checkpoint(self.path)


def worker(args: dict) -> None:
    """One rank of a torchrun launch: fit, then write this rank's record."""
    from src.distributed.strategies import DeepSpeedEnginesStrategy, GradSyncDDPStrategy

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args["strategy"] == "ddp":
        strategy = GradSyncDDPStrategy()
    else:
        strategy = DeepSpeedEnginesStrategy(stage=2, bf16=False, frozen_dtype="float32")
    root = Path(args["root"])
    plan = batch_plan(GLOBAL_BATCH, world, micro_batch_size=1)
    assert plan["grad_accumulation"] == 2
    record = fit(args["teacher"], root, strategy, grad_accumulation=plan["grad_accumulation"], rank=rank, world=world,
                 max_steps=args["max_steps"],
                 ckpt_path=args.get("ckpt_path"), save_after=args.get("save_after"))
    (root / f"record-{rank}.json").write_text(json.dumps({"losses": record.losses, "exit_steps": record.exit_steps}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(root: Path, **args) -> list[dict]:
    root.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", __file__, json.dumps({"root": str(root), **args})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return [json.loads((root / f"record-{r}.json").read_text()) for r in range(2)]


def assert_same_losses(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in w:
            assert g[key] == pytest.approx(w[key], rel=RTOL), (key, g, w)


@pytest.fixture(scope="module")
def reference(teacher, tmp_path_factory) -> list[dict]:
    """1 process, batch 4; the same with 4 accumulated micro-batches of 1 must give the same losses."""
    torch.set_num_threads(1)
    one = fit(teacher, tmp_path_factory.mktemp("one")).losses
    accumulated = fit(teacher, tmp_path_factory.mktemp("acc"),
                      grad_accumulation=batch_plan(GLOBAL_BATCH, 1, micro_batch_size=1)["grad_accumulation"]).losses
    assert len(one) == ITERATIONS and {"train/dmd", "train/fkl", "train/critic"} <= one[0].keys()
    assert_same_losses(accumulated, one)
    return one


def test_ddp_two_processes_match_one(teacher, reference, tmp_path):
    records = torchrun(tmp_path, strategy="ddp", teacher=teacher, max_steps=STEPS)
    assert records[0]["exit_steps"] == records[1]["exit_steps"]  # every rank draws the same exit steps
    assert records[0]["losses"] == records[1]["losses"]  # logged losses are the global batch's on every rank
    assert_same_losses(records[0]["losses"], reference)


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="DeepSpeed not installed: pip install -e '.[deepspeed]'")
def test_deepspeed_zero2_two_processes_match_one_and_resume(teacher, reference, tmp_path):
    records = torchrun(tmp_path / "run", strategy="deepspeed_zero2", teacher=teacher, max_steps=STEPS, save_after=2)
    assert records[0]["exit_steps"] == records[1]["exit_steps"]
    assert_same_losses(records[0]["losses"], reference)
    checkpoint = tmp_path / "run" / "resume.ckpt"
    assert (checkpoint / "lightning.ckpt").is_file()
    assert {p.name for p in checkpoint.iterdir() if p.is_dir()} == {"generator", "critic"}
    assert [p.name for p in checkpoint.parent.iterdir() if p.name.startswith(".")] == []  # no temporary left
    resumed = torchrun(tmp_path / "resumed", strategy="deepspeed_zero2", teacher=teacher, max_steps=STEPS,
                       ckpt_path=str(checkpoint))
    assert len(resumed[0]["losses"]) == 1  # iteration 2 only: the second save replaced the first
    assert_same_losses(resumed[0]["losses"], records[0]["losses"][2:])


def test_launch_overrides():
    from src.distributed.launch import rank_environment, rank_overrides

    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}
    assert rank_environment(env) == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    assert rank_environment({**env, "RANK": "3"}) == {"WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    assert rank_overrides(["x=1"], {"RANK": "0", "HIAR_RUN_DIR": "/r"}) == ["x=1", "hydra.run.dir=/r"]
    assert "hydra/job_logging=disabled" in rank_overrides([], {"RANK": "1", "WORLD_SIZE": "2"})
    with pytest.raises(SystemExit, match="multirun"):
        rank_overrides(["-m", "a=1,2"], {"RANK": "0", "WORLD_SIZE": "2"})


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))


def test_global_batch_plan_of_the_documented_launches():
    from hydra import compose, initialize_config_dir

    assert batch_plan(64, 8, 1, 1) == {"world_size": 8, "rank_batch_size": 8, "micro_batch_size": 1,
                                       "grad_accumulation": 8}
    assert batch_plan(64, 8, 8, 1)["grad_accumulation"] == 1
    assert batch_plan(8, [0, 1], 1, None) == {"world_size": 2, "rank_batch_size": 4, "micro_batch_size": 4,
                                              "grad_accumulation": 1}
    with pytest.raises(ValueError, match="world.training.batch_size=64"):
        batch_plan(64, 3)
    with pytest.raises(ValueError, match="world.training.micro_batch_size=3"):
        batch_plan(64, 8, 1, 3)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for devices, nodes, accumulation in ((8, 1, 8), (8, 8, 1), (1, 1, 64)):
            cfg = compose("train", overrides=["experiment=hiar_fkl", "world=wan2.1_1.3b", "trainer=gpu_bf16",
                                              f"trainer.devices={devices}", f"trainer.num_nodes={nodes}"])
            assert cfg.data.batch_size == 64 // (devices * nodes)
            assert cfg.task.grad_accumulation == accumulation
            assert cfg.task.teacher_dtype == "bfloat16" and cfg.parallelize.activation_checkpointing
        cfg = compose("train", overrides=["experiment=hiar_fkl", "world=wan2.1_1.3b", "trainer.devices=3"])
        with pytest.raises(Exception, match="not a positive multiple of trainer.devices x trainer.num_nodes = 3"):
            _ = cfg.data.batch_size
