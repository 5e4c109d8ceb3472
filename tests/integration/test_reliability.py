"""Training never silently loses or corrupts work (issue 18): deterministic streams, exact resume (also after kill -9,
under one process and 2-process ddp), atomic checkpoint writes, the non-finite guard, task checks on resume, and bad
inputs failing before any work with the file or key named."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging

from src import io as io_module
from src.io import (
    InputError,
    atomic_path,
    clean_partial,
    commit_folder,
    read_prompt_file,
    temporary_sibling,
    verify_checksum,
    write_checksum,
)
from src.models.wan import WanConfig
from src.schema import validate_config
from src.training import checkpoint_io, ode_pairs
from src.training.checkpoint_io import AtomicCheckpointIO, IterationCheckpoint, read_checkpoint
from src.training.data import DistillDataModule, OdePairsDataModule, ShardIndex
from src.training.distill import DistillTask
from src.training.guards import NonFiniteError
from src.training.ode_init import OdeInitTask
from src.training.ode_pairs import OdePairsTask, PairShardWriter, PromptChunksDataModule
from src.worlds.toy.data import ToyVideoDataModule, write_shards

from helpers import SAMPLER, TINY_MODEL, TOY_PROMPTS, tiny_teacher_task, tiny_world
from reliability_faults import InfLossAt, write_pair_manifest, write_pair_shards

ROOT = Path(__file__).parents[2]
FRAMES = 6
SHAPE = (5, FRAMES, 12, 4, 4)  # trajectory [K, F, C, h, w] of the tiny world
RATIO = 2  # generator iterations 0, 2, 4, ...
STREAM = {"gen_update_ratio": RATIO, "grad_accumulation": 1, "fkl_weight": 0.1}  # the task's settings, as the YAML gives


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pairs")
    write_pair_shards(folder, 6, SHAPE, per_shard=4)
    return folder


def make_task(teacher: str, export_dir: Path, **kw) -> DistillTask:
    return DistillTask(world=tiny_world(teacher), sampler=SAMPLER, num_frames=FRAMES, gen_update_ratio=RATIO,
                       optim={"lr_generator": 1e-3, "lr_critic": 1e-3}, ema={"decay": 0.9, "start": 1},
                       export_dir=str(export_dir), **kw)


class Record(L.Callback):
    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses[int(module.iteration) - 1] = {k: float(v) for k, v in trainer.callback_metrics.items()}


def fit(teacher, shards, root: Path, iterations: int, ckpt_path=None, callbacks=(), every=2, **task_kw):
    task, record = make_task(teacher, root / "export", **task_kw), Record()
    data = DistillDataModule(prompts=TOY_PROMPTS, num_prompts=5, shard_dir=str(shards), batch_size=2, seed=0,
                             gen_update_ratio=task.hparams.gen_update_ratio, fkl_weight=task.hparams.fkl["weight"],
                             grad_accumulation=task.hparams.grad_accumulation)
    steps = sum(1 + (i % RATIO == 0) for i in range(iterations))
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root, plugins=[AtomicCheckpointIO()],
                        callbacks=[record, IterationCheckpoint(every_n_iterations=every, dirpath=root / "ckpt",
                                                               save_last=True, save_top_k=-1), *callbacks])
    trainer.fit(task, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    return record.losses, task


def test_same_seed_same_losses_and_exact_resume(teacher, shards, tmp_path):
    """Two runs of the same seed log identical metrics; resuming at iteration 2 repeats the straight run's losses
    bit for bit (data, draws, optimizer and EMA state); checkpoints come every 2 *iterations*, with checksums."""
    straight, _ = fit(teacher, shards, tmp_path / "a", 5)
    again, _ = fit(teacher, shards, tmp_path / "b", 5)
    assert straight == again and set(straight) == set(range(5))
    assert {"train/dmd", "train/fkl", "train/critic", "train/nonfinite_skips"} <= straight[0].keys()
    names = sorted(p.name for p in (tmp_path / "a" / "ckpt").glob("*.ckpt"))
    assert names == ["iteration-000002.ckpt", "iteration-000004.ckpt", "iteration-000005.ckpt", "last.ckpt"]
    assert all(verify_checksum(tmp_path / "a" / "ckpt" / n) for n in names)
    resumed, _ = fit(teacher, shards, tmp_path / "c", 5, ckpt_path=str(tmp_path / "a" / "ckpt" / "iteration-000002.ckpt"))
    assert set(resumed) == {2, 3, 4}
    assert all(resumed[i] == straight[i] for i in resumed)
    assert verify_checksum(tmp_path / "a" / "export" / "model.pt")


def test_streams_follow_the_iteration_whatever_the_world_size(shards):
    """Rank batches of a 2-process run are the halves of the 1-process global batch; the critic draws its own prompts;
    a stream started at iteration 3 gives what the stream from 0 gives at 3."""

    class Module:
        def __init__(self, iteration):
            self.iteration = torch.tensor(iteration)

    class Trainer:
        def __init__(self, iteration, rank, world):
            self.lightning_module, self.global_rank, self.world_size = Module(iteration), rank, world

    def batches(iteration, rank, world, per_rank, n):
        data = DistillDataModule(prompts=TOY_PROMPTS, num_prompts=5, shard_dir=str(shards), batch_size=per_rank,
                                 **STREAM)
        data.trainer = Trainer(iteration, rank, world)
        stream = iter(data.train_dataloader())
        return [next(stream) for _ in range(n)]

    one = batches(0, 0, 1, 4, 5)
    halves = [batches(0, r, 2, 2, 5) for r in range(2)]
    for i, b in enumerate(one):
        assert halves[0][i]["critic_prompt"] + halves[1][i]["critic_prompt"] == b["critic_prompt"]
        if i % RATIO == 0:
            assert torch.equal(torch.cat([h[i]["trajectory"] for h in halves]), b["trajectory"])
            assert b["prompt"] != b["critic_prompt"]
        else:
            assert "prompt" not in b and "trajectory" not in b
    late = batches(3, 0, 1, 4, 2)
    assert [b["critic_prompt"] for b in late] == [b["critic_prompt"] for b in one[3:5]]
    assert torch.equal(late[1]["trajectory"], one[4]["trajectory"]) and int(late[0]["iteration"]) == 3
    drawn = {p for b in one for p in b["critic_prompt"] + b.get("prompt", [])}
    assert drawn == set(DistillDataModule(prompts=TOY_PROMPTS, num_prompts=5, shard_dir=str(shards),
                                          **STREAM).prompts)  # all lines


def test_inf_is_skipped_and_counted_nan_stops_without_export(teacher, shards, tmp_path):
    losses, task = fit(teacher, shards, tmp_path / "inf", 4, callbacks=[InfLossAt([1])])
    assert losses[3]["train/nonfinite_skips"] == 1.0 and losses[0]["train/nonfinite_skips"] == 0.0
    assert all(torch.isfinite(p).all() for p in task.critic.parameters())
    assert (tmp_path / "inf" / "export" / "model.pt").is_file()
    with pytest.raises(NonFiniteError, match=r"3 optimizer steps in a row.*iteration 3.*Last good checkpoint: \S+"
                                             r"iteration-000002.ckpt"):
        fit(teacher, shards, tmp_path / "nan", 6, callbacks=[InfLossAt([1, 2, 3, 4, 5], float("nan"))])
    assert not (tmp_path / "nan" / "export").exists()
    read_checkpoint(tmp_path / "nan" / "ckpt" / "iteration-000002.ckpt")  # the last good one loads


def test_nan_teacher_fails_the_dmd_gradient_instead_of_zeroing_it(teacher, tmp_path):
    task = make_task(teacher, tmp_path)
    with torch.no_grad():
        next(task.teacher.parameters()).view(-1)[0] = float("nan")
    x = torch.randn(1, FRAMES, 12, 4, 4)
    cond, uncond = task.encode_text(["a red circle moving left on a gray background"])
    with pytest.raises(NonFiniteError, match=r"DMD gradient at iteration 0: \d+ of \d+ elements.*teacher output "
                                             "finite: False"):
        task.dmd_gradient(x, cond, uncond)


def test_interrupted_or_non_finite_checkpoint_write_keeps_the_previous(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)

    def killed_midway(obj, f):
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the writer dies mid-write

    monkeypatch.setattr(checkpoint_io.torch, "save", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(3))
    with pytest.raises(NonFiniteError, match=r"state_dict.w \(1\)"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan")])}}, path)
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(3))
    leftover = tmp_path / ".last.ckpt.tmp-123-deadbeef"  # what a SIGKILL mid-write leaves
    leftover.write_bytes(b"partial")
    assert clean_partial(tmp_path) == [leftover] and sorted(p.name for p in tmp_path.iterdir()) == [
        "last.ckpt", "last.ckpt.sha256"]


def test_folder_checkpoint_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A folder checkpoint (DeepSpeed's: one folder per engine + lightning.ckpt, written by every rank into a temporary
    sibling, then `commit_folder`): a writer dying midway, or a kill between the two renames of the swap, leaves the
    previous checkpoint; SIGKILL leftovers are cleaned at start."""
    path = tmp_path / "last.ckpt"

    def write(folder: Path, value: str) -> None:
        (folder / "generator").mkdir(parents=True)
        (folder / "generator" / "mp_rank_00_model_states.pt").write_text(value)
        (folder / "lightning.ckpt").write_text(value)

    def content(folder: Path) -> set[str]:
        return {f.read_text() for f in folder.rglob("*") if f.is_file()}

    old = temporary_sibling(path)
    write(old, "old")
    commit_folder(old, path)
    with pytest.raises(KeyboardInterrupt), atomic_path(path) as tmp:  # the writer dies after half the files
        (tmp / "generator").mkdir(parents=True)
        raise KeyboardInterrupt
    assert content(path) == {"old"} and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]

    new = temporary_sibling(path)
    write(new, "new")
    renames = []

    def killed_after_first_rename(src, dst):
        if renames:
            raise SystemExit("killed")
        renames.append(src)
        os.rename(src, dst)

    monkeypatch.setattr(io_module.os, "replace", killed_after_first_rename)
    with pytest.raises(SystemExit):
        commit_folder(new, path)
    monkeypatch.undo()
    assert not path.exists() and len(renames) == 1  # only the aside copy and the new temporary remain
    assert clean_partial(tmp_path) == [new] and content(path) == {"old"}  # the previous checkpoint is back

    new = temporary_sibling(path)
    write(new, "new")
    commit_folder(new, path)
    assert content(path) == {"new"} and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    aside = tmp_path / ".last.ckpt.old-123-deadbeef"  # killed after the swap, before removing the old copy
    write(aside, "old")
    assert clean_partial(tmp_path) == [aside] and content(path) == {"new"}


def test_bad_checkpoints_fail_naming_the_file(teacher, tmp_path):
    empty = tmp_path / "empty.ckpt"
    empty.touch()
    with pytest.raises(InputError, match=f"checkpoint {empty} is empty"):
        read_checkpoint(empty)
    good = tmp_path / "good.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(64)}}, good)
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit... byte
    good.write_bytes(bytes(data))
    with pytest.raises(InputError, match=f"{good}: sha256 .* does not match"):
        read_checkpoint(good)
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"payload": WanConfig(**TINY_MODEL)}, pickled)  # an arbitrary object: refused, weights_only
    with pytest.raises(InputError, match=f"checkpoint {pickled} cannot be read with weights_only=True"):
        read_checkpoint(pickled)


def test_resume_refuses_another_task_or_other_models(teacher, tmp_path):
    task = make_task(teacher, tmp_path)
    state = {k: v for k, v in task.state_dict().items() if not k.startswith("teacher.")}
    with pytest.raises(InputError, match="from task src.training.ode_init.OdeInitTask, this run is "
                                         "src.training.distill.DistillTask"):
        task.on_load_checkpoint({"hiar_task": {"class": "src.training.ode_init.OdeInitTask", "groups": ["generator"]},
                                 "state_dict": state})
    record = checkpoint_io.task_record(task, state)
    key = next(k for k in state if k.startswith("generator.") and state[k].ndim == 2)
    wrong = {**state, key: torch.zeros(3, 3)}
    with pytest.raises(InputError, match=f"shapes differ: {key} \\[3, 3\\] vs"):
        task.on_load_checkpoint({"hiar_task": record, "state_dict": wrong})
    without_critic = {k: v for k, v in state.items() if not k.startswith("critic.")}
    with pytest.raises(InputError, match=r"model groups \['critic'\] absent"):
        task.on_load_checkpoint({"hiar_task": checkpoint_io.task_record(task, without_critic),
                                 "state_dict": without_critic})
    with pytest.raises(InputError, match="no task record"):
        task.on_load_checkpoint({"state_dict": state})


def test_bad_inputs_fail_before_any_work_naming_the_file_or_key(teacher, shards, tmp_path):
    with pytest.raises(InputError, match="task.fkl.weight: expected a number, got 'abc'"):
        validate_config({"stage": "student", "task": {"fkl": {"weight": "abc"}}})
    with pytest.raises(InputError, match="task.ema.decay: must be <= 1, got 2"):
        validate_config({"stage": "student", "task": {"ema": {"decay": 2}}})
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match=f"task.export_dir: {blocker}/out is not writable"):
        validate_config({"stage": "student", "task": {"export_dir": f"{blocker}/out"}})
    empty = tmp_path / "empty.ckpt"
    empty.touch()
    with pytest.raises(InputError, match=f"ckpt_path: {empty} is empty"):
        validate_config({"ckpt_path": str(empty)})
    with pytest.raises(InputError, match="task.world.teacher_checkpoint: .*missing.safetensors"):
        validate_config({"stage": "student", "task": {
            "generator_init": None, "world": {"teacher_checkpoint": str(tmp_path / "missing.safetensors")}}})
    binary = tmp_path / "prompts.txt"
    binary.write_bytes(b"a cat\n\xff\xfe\x00\x01")
    with pytest.raises(InputError, match=f"prompt file {binary}: holds a NUL byte"):
        validate_config({"data": {"prompts": str(binary)}})
    binary.write_bytes(b"a cat\nnot \xff utf-8\n")
    with pytest.raises(InputError, match=f"prompt file {binary}: line 2 is not UTF-8"):
        read_prompt_file(binary)
    shard = sorted(shards.glob("ode-*.tar"))[0]
    cut = tmp_path / "cut" / shard.name
    cut.parent.mkdir()
    cut.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(InputError, match=f"shard {cut}"):
        ShardIndex([str(cut)], ("npy", "json"), verify=False)
    with pytest.raises(InputError, match=f"shards {shards}: samples have shape \\[5, 6, 12, 4, 4\\], this run expects"):
        ShardIndex(sorted(str(p) for p in shards.glob("*.tar")), ("npy", "json"), (5, 9, 12, 4, 4))


# --------------------------------------------------------------------------------------------- teacher stage

WARMUP = {"shape": "circle", "color": "red", "background": "black"}


class StepLosses(L.Callback):
    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses[trainer.global_step - 1] = float(trainer.callback_metrics["train/loss"])


def fit_teacher(root: Path, source: str, shard_dir: Path, ckpt_path=None) -> tuple[dict, dict]:
    record = StepLosses()
    task = tiny_teacher_task(clip_frames=[3, 5], warmup_steps=2, seed=0)
    data = ToyVideoDataModule(source=source, shard_dir=str(shard_dir), num_frames=5, batch_size=2, warmup_batches=3,
                              warmup_attributes=WARMUP, warmup_frames=3)
    trainer = L.Trainer(max_steps=5, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root, plugins=[AtomicCheckpointIO()],
                        callbacks=[record, EMAWeightAveraging(decay=0.9),
                                   IterationCheckpoint(every_n_iterations=2, dirpath=root / "ckpt", save_top_k=-1)])
    trainer.fit(task, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    return record.losses, read_checkpoint(root / "ckpt" / "iteration-000005.ckpt")["state_dict"]


@pytest.mark.parametrize("source", ["procedural", "shards"])
def test_teacher_resume_gives_the_straight_runs_losses(source, tmp_path):
    """The teacher stage resumed from iteration 2 (inside the warm-up world) repeats the straight run's loss at every
    step bit for bit and ends on the same (EMA) weights: data, clip lengths, dropout, noise levels and noise are keyed
    by (seed, iteration, sample index)."""
    shards = tmp_path / "videos"
    write_shards(shards, num_videos=6, num_frames=5, videos_per_shard=4)
    straight, weights = fit_teacher(tmp_path / "a", source, shards)
    assert set(straight) == set(range(5))
    resumed, resumed_weights = fit_teacher(tmp_path / "b", source, shards,
                                           ckpt_path=tmp_path / "a" / "ckpt" / "iteration-000002.ckpt")
    assert resumed == {i: straight[i] for i in (2, 3, 4)}
    assert weights.keys() == resumed_weights.keys() and all(torch.equal(v, resumed_weights[k]) for k, v in weights.items())


# --------------------------------------------------------------------------------------------- ODE init, ODE pairs


class IterationLosses(L.Callback):
    """Loss of each iteration (batch) by the stream's own position, accumulated batches included."""

    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses[int(batch["iteration"])] = float(outputs["loss"])


def fit_ode_init(teacher: str, shards: Path, root: Path, ckpt_path=None) -> tuple[dict, dict]:
    record = IterationLosses()
    task = OdeInitTask(world=tiny_world(teacher), frames_per_block=3, lr=1e-3,
                       export_path=str(root / "ode_init.safetensors"))
    trainer = L.Trainer(max_steps=3, accumulate_grad_batches=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, plugins=[AtomicCheckpointIO()],
                        callbacks=[record, IterationCheckpoint(every_n_iterations=2, dirpath=root / "ckpt", save_top_k=-1)])
    trainer.fit(task, datamodule=OdePairsDataModule(str(shards), batch_size=2), ckpt_path=ckpt_path,
                weights_only=True)
    return record.losses, task.generator.state_dict()


def test_ode_init_resume_gives_the_straight_runs_losses(teacher, shards, tmp_path):
    """ODE init (2 batches accumulated per step) resumed after step 2 reads batches 4-5 and repeats the straight
    run's losses bit for bit (stream position = steps x accumulation; levels keyed by the batch's iteration)."""
    straight, weights = fit_ode_init(teacher, shards, tmp_path / "a")
    assert set(straight) == set(range(6))
    resumed, resumed_weights = fit_ode_init(teacher, shards, tmp_path / "b",
                                            ckpt_path=tmp_path / "a" / "ckpt" / "iteration-000002.ckpt")
    assert resumed == {i: straight[i] for i in (4, 5)}
    assert all(torch.equal(v, resumed_weights[k]) for k, v in weights.items())


class Killed(Exception):
    """Stands for the process dying: raised from the writer, after a shard's rename and before its checksum."""


def write_pairs(teacher: str, shard_dir: Path, kill_at_chunk: int | None = None) -> list[int]:
    """Tiny ODE-pair generation (5 prompts, 2 per shard: 3 shards); returns the chunks it computed."""
    from lightning.pytorch.callbacks import Callback

    computed = []

    class Seen(Callback):
        def on_predict_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
            computed.append(int(batch["chunk"]))

    def checksum_or_die(path):
        if kill_at_chunk is not None and path.name == f"ode-{kill_at_chunk:06d}.tar":
            raise Killed(path)
        return write_checksum(path)

    task = OdePairsTask(world=tiny_world(teacher), num_frames=FRAMES, num_steps=2, save_indices=[0, 1, 2], batch_size=2)
    data = PromptChunksDataModule(TOY_PROMPTS, num_prompts=5, pairs_per_shard=2, shard_dir=str(shard_dir))
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[PairShardWriter(str(shard_dir)), Seen()])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ode_pairs, "write_checksum", checksum_or_die)
        trainer.predict(task, datamodule=data, return_predictions=False)
    return computed


def test_ode_pairs_killed_midway_rebuild_only_what_is_missing_and_give_identical_shards(teacher, tmp_path):
    """Generation dies after shard 1's rename, before its checksum; a SIGKILL leftover of shard 2 lies in the folder.
    The rerun removes the leftover, keeps shard 0, rewrites shard 1 (no checksum: not done) and writes shard 2; every
    shard and checksum is byte-identical to a straight run's."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert write_pairs(teacher, straight) == [0, 1, 2]
    with pytest.raises(Killed):
        write_pairs(teacher, killed, kill_at_chunk=1)
    assert sorted(p.name for p in killed.iterdir()) == [
        "manifest.json", "ode-000000.tar", "ode-000000.tar.sha256", "ode-000001.tar"]
    leftover = killed / ".ode-000002.tar.tmp-999-deadbeef"
    leftover.write_bytes(b"half a shard")
    assert write_pairs(teacher, killed) == [1, 2]
    names = sorted(p.name for p in straight.iterdir())
    assert sorted(p.name for p in killed.iterdir()) == names and len(names) == 7
    assert all((killed / n).read_bytes() == (straight / n).read_bytes() for n in names)
    assert all(verify_checksum(p) for p in killed.glob("ode-*.tar"))


# --------------------------------------------------------------------------------------------- kill -9, via the CLI

TINY_OVERRIDES = [f"world.{m}.{k}={v}" for m in ("teacher", "student", "critic") for k, v in TINY_MODEL.items()
                  if k != "patch_size"] + [
    "world.latent.height=4", "world.latent.width=4", "world.text_encoder.text_len=8",
    "world.text_encoder.text_dim=16", "world.training.batch_size=2", "+world.training.num_prompts=5",
    f"task.num_frames={FRAMES}", f"task.gen_update_ratio={RATIO}", "task.generator_init=null", "task.ema.start=1",
    "trainer.log_every_n_steps=1", "callbacks.checkpoint.every_n_iterations=2", "~callbacks.progress",
    "trainer.enable_progress_bar=false",
    "trainer.max_steps=8",  # 5 iterations
]


def cli(root: Path, teacher: str, *extra: str, ddp: bool = False) -> subprocess.CompletedProcess:
    run_dir = root / "run"
    args = ["experiment=hiar_fkl", *TINY_OVERRIDES, f"world.teacher_checkpoint={teacher}", f"paths.root_dir={root}",
            f"hydra.run.dir={run_dir}", *extra]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    if ddp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "src.distributed.launch", *args, "strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
        # world.training.batch_size is the global batch: 2 samples, one per process
        env["HIAR_RUN_DIR"] = str(run_dir)
    else:
        cmd = [sys.executable, "-m", "src.train", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, start_new_session=True)


def logged(root: Path) -> dict[str, dict[str, str]]:
    """step -> the losses logged at that step (CSV: exact float repr)."""
    rows = {}
    for path in (root / "run" / "csv").glob("version_*/metrics.csv"):
        for row in csv.DictReader(path.open()):
            rows.setdefault(row["step"], {}).update({k: v for k, v in row.items() if v and k.startswith("train/")})
    return rows


@pytest.mark.parametrize("ddp", [False, True], ids=["one_process", "ddp_2_processes"])
def test_kill_9_and_resume_gives_the_straight_runs_losses(teacher, tmp_path, ddp):
    for root in (tmp_path / "straight", tmp_path / "killed"):
        shards = root / "artifacts" / "toy" / "ode_pairs"
        write_pair_shards(shards, 6, SHAPE, per_shard=4)
        write_pair_manifest(shards, ["experiment=hiar_fkl", *TINY_OVERRIDES, f"world.teacher_checkpoint={teacher}",
                                     f"paths.root_dir={root}"])
    straight = cli(tmp_path / "straight", teacher, ddp=ddp)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = cli(tmp_path / "killed", teacher, "+callbacks.fault._target_=reliability_faults.KillAt",
                 "+callbacks.fault.iteration=3", ddp=ddp)
    assert killed.returncode != 0 and not (tmp_path / "killed" / "artifacts" / "toy" / "hiar_fkl").exists()
    checkpoint = tmp_path / "killed" / "run" / "checkpoints" / "last.ckpt"
    assert read_checkpoint(checkpoint)["state_dict"]["iteration"] == 2
    (tmp_path / "killed" / "run" / "csv").rename(tmp_path / "killed" / "csv_before_kill")
    resumed = cli(tmp_path / "killed", teacher, f"ckpt_path={checkpoint}", ddp=ddp)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = logged(tmp_path / "straight"), logged(tmp_path / "killed")
    assert len(want) == 5 and len(got) == 3 and all(got[step] == want[step] for step in got), (got, want)
    exported = [tmp_path / r / "artifacts" / "toy" / "hiar_fkl" / "student.safetensors" for r in ("straight", "killed")]
    assert exported[0].read_bytes() == exported[1].read_bytes()
