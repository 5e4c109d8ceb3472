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

sys.path.insert(0, str(Path(__file__).parent))
from reliability_faults import InfLossAt, write_pair_manifest, write_pair_shards  # noqa: E402
from test_distill import SAMPLER, TINY_MODEL, tiny_world  # noqa: E402

from src.checkpoints import save_dit  # noqa: E402
from src.io import clean_partial, verify_checksum  # noqa: E402
from src.models.wan import WanConfig, WanDiT  # noqa: E402
from src.training import reliability  # noqa: E402
from src.training.distill import DistillTask  # noqa: E402
from src.training.reliability import (  # noqa: E402
    AtomicCheckpointIO,
    IterationCheckpoint,
    NonFiniteError,
    read_checkpoint,
    validate_config,
)
from src.training.streams import DistillDataModule, InputError, ShardIndex, read_prompt_file  # noqa: E402

ROOT = Path(__file__).parents[1]
FRAMES = 6
SHAPE = (5, FRAMES, 12, 4, 4)  # trajectory [K, F, C, h, w] of the tiny world
RATIO = 2  # generator iterations 0, 2, 4, ...


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_dit(WanDiT(WanConfig(**TINY_MODEL)), path)
    return str(path)


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
    data = DistillDataModule(prompts="toy", num_prompts=5, shard_dir=str(shards), batch_size=2, seed=0)
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
        hparams = {"gen_update_ratio": RATIO, "grad_accumulation": 1, "fkl": {"weight": 0.1}}

        def __init__(self, iteration):
            self.iteration = torch.tensor(iteration)

    class Trainer:
        def __init__(self, iteration, rank, world):
            self.lightning_module, self.global_rank, self.world_size = Module(iteration), rank, world

    def batches(iteration, rank, world, per_rank, n):
        data = DistillDataModule(prompts="toy", num_prompts=5, shard_dir=str(shards), batch_size=per_rank)
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
    assert drawn == set(DistillDataModule(prompts="toy", num_prompts=5, shard_dir=str(shards)).prompts)  # all lines


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

    monkeypatch.setattr(reliability.torch, "save", killed_midway)
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
    record = reliability.task_record(task, state)
    key = next(k for k in state if k.startswith("generator.") and state[k].ndim == 2)
    wrong = {**state, key: torch.zeros(3, 3)}
    with pytest.raises(InputError, match=f"shapes differ: {key} \\[3, 3\\] vs"):
        task.on_load_checkpoint({"hiar_task": record, "state_dict": wrong})
    without_critic = {k: v for k, v in state.items() if not k.startswith("critic.")}
    with pytest.raises(InputError, match=r"model groups \['critic'\] absent"):
        task.on_load_checkpoint({"hiar_task": reliability.task_record(task, without_critic),
                                 "state_dict": without_critic})
    with pytest.raises(InputError, match="no task record"):
        task.on_load_checkpoint({"state_dict": state})


def test_bad_inputs_fail_before_any_work_naming_the_file_or_key(teacher, shards, tmp_path):
    with pytest.raises(InputError, match="task.fkl.weight: expected a number, got 'abc'"):
        validate_config({"task": {"_target_": "src.training.distill.DistillTask", "fkl": {"weight": "abc"}}})
    with pytest.raises(InputError, match="task.ema.decay: must be <= 1, got 2"):
        validate_config({"task": {"_target_": "src.training.distill.DistillTask", "ema": {"decay": 2}}})
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match=f"task.export_dir: {blocker}/out is not writable"):
        validate_config({"task": {"_target_": "src.training.distill.DistillTask", "export_dir": f"{blocker}/out"}})
    empty = tmp_path / "empty.ckpt"
    empty.touch()
    with pytest.raises(InputError, match=f"ckpt_path: {empty} is empty"):
        validate_config({"ckpt_path": str(empty)})
    with pytest.raises(InputError, match="task.world.teacher_checkpoint: .*missing.safetensors"):
        validate_config({"task": {"_target_": "src.training.distill.DistillTask", "generator_init": None,
                                  "world": {"teacher_checkpoint": str(tmp_path / "missing.safetensors")}}})
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
