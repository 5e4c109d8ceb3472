"""Nothing lost at the edges (issue 26): the export is a step of its own that every kill point and a resume leave
complete and verified; a publish holds under concurrency and interruption; a full disk says so and keeps the previous
checkpoint; a run that trained nothing exports nothing; the smaller items (rebuild hint, deterministic model.pt,
metrics.csv rows, the resume fallback)."""

from __future__ import annotations

import csv
import errno
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf
from test_reliability import TINY_OVERRIDES

from src import artifacts
from src.artifacts import MANIFEST, PUBLISHED, VERSIONS, ProvenanceError, Stage
from src.checkpoints import export_training_checkpoint
from src.io import OLD_MARK, TMP_MARK, DiskFullError, atomic_write_text, file_mode, verify_checksum
from src.training import checkpoint_io
from src.training.checkpoint_io import AtomicCheckpointIO, IterationCheckpoint, read_checkpoint, resume_path
from src.training.data import DistillDataModule
from src.training.distill import DistillTask
from src.training.guards import NonFiniteError

from helpers import CONF, SAMPLER, TOY_PROMPTS, tiny_world
from reliability_faults import InfLossAt, write_pair_manifest, write_pair_shards

ROOT = Path(__file__).parents[2]
FRAMES, RATIO = 6, 2
SHAPE = (5, FRAMES, 12, 4, 4)
STAGE = Stage("hiar_fkl", "python -m src.train experiment=hiar_fkl", {})  # the student stage, settings aside
WEIGHTS = ("model.pt", "model.pt.sha256", "student.safetensors", "student.safetensors.sha256")


class Killed(BaseException):  # noqa: N818 -- stands for the process dying: no handler catches it
    pass


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pairs")
    write_pair_shards(folder, 6, SHAPE, per_shard=4)
    return folder


def fit(teacher, shards, root: Path, iterations: int, ckpt_path=None, callbacks=(), logger=False, **task_kw):
    task = DistillTask(world=tiny_world(teacher), sampler=SAMPLER, num_frames=FRAMES, gen_update_ratio=RATIO,
                       optim={"lr_generator": 1e-3, "lr_critic": 1e-3}, ema={"decay": 0.9, "start": 1},
                       export_dir=str(root / "export"), **task_kw)
    data = DistillDataModule(prompts=TOY_PROMPTS, num_prompts=5, shard_dir=str(shards), batch_size=2, seed=0,
                             gen_update_ratio=RATIO, grad_accumulation=1, fkl_weight=task.hparams.fkl["weight"])
    trainer = L.Trainer(max_steps=sum(1 + (i % RATIO == 0) for i in range(iterations)), logger=logger,
                        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root, plugins=[AtomicCheckpointIO()],
                        callbacks=[IterationCheckpoint(every_n_iterations=1, dirpath=root / "ckpt", save_last=True,
                                                       save_top_k=-1), *callbacks])
    trainer.fit(task, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    return task


def export_and_publish(task: DistillTask, artifacts_dir: Path) -> Path:
    """What src.train does after fit: the export step, the manifest of the files it must hold, the publish."""
    export_dir = task.export_folder()
    cfg = OmegaConf.create({"paths": {"output_dir": str(export_dir.parent)}})
    artifacts.write_manifest(export_dir, cfg, STAGE, {}, required=task.export())
    return artifacts.publish(export_dir, artifacts_dir, STAGE.name)


def weights(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in WEIGHTS}


def renames_dying_at(monkeypatch, k: int | None, seen: list):
    """os.replace that raises Killed at its k-th call (None: never), recording every call in `seen`."""
    real = os.replace

    def replace(src, dst):
        if k is not None and len(seen) == k:
            raise Killed(f"{src} -> {dst}")
        seen.append(Path(dst).name)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


# --------------------------------------------------------------------------------------------- the export


def test_each_kill_point_of_the_export_then_a_resume_leaves_a_complete_verified_export(teacher, shards, tmp_path,
                                                                                       monkeypatch):
    """The export + manifest + publish sequence killed at each of its renames (model.pt, its checksum, the student,
    its checksum, the manifest, the version folder, the stage link), with a SIGKILL's leftover temporary beside it:
    the published student stays whole and verified throughout, and the resume (a new export of the same final
    state) leaves a complete verified export and publishes it, byte for byte what the straight run published."""
    task = fit(teacher, shards, tmp_path / "run", 1)
    export_dir, artifacts_dir = tmp_path / "run" / "export", tmp_path / "artifacts"
    want = weights(export_and_publish(task, artifacts_dir))
    seen: list[str] = []
    task.exported = None  # a new process
    renames_dying_at(monkeypatch, None, seen)
    export_and_publish(task, artifacts_dir)
    monkeypatch.undo()
    points = list(seen)
    assert [p for p in points if not p.startswith(".")][:5] == [*WEIGHTS, MANIFEST] and len(points) >= 7, points
    for k, point in enumerate(points):
        task.exported = None
        renames_dying_at(monkeypatch, k, [])
        with pytest.raises(Killed):
            export_and_publish(task, artifacts_dir)
        monkeypatch.undo()
        stage = artifacts_dir / STAGE.name
        assert artifacts.verify_export(stage) and weights(stage) == want, f"killed before {point}"
        (export_dir / ".student.safetensors.tmp-999-deadbeef").write_bytes(b"half a student")  # a SIGKILL's leftover
        task.exported = None  # the resume: a new process from the final checkpoint
        task.on_fit_start()  # removes the leftover
        published = export_and_publish(task, artifacts_dir)
        assert artifacts.verify_export(export_dir) and weights(published) == want, f"killed before {point}"
        assert sorted(p.name for p in export_dir.iterdir()) == sorted([*WEIGHTS, MANIFEST])
        assert not [p for p in artifacts_dir.iterdir() if TMP_MARK in p.name or OLD_MARK in p.name]


def test_a_resume_at_max_steps_still_exports_from_the_final_checkpoint(teacher, shards, tmp_path):
    """Lightning's fit loop returns at once from a checkpoint already at max_steps, skipping on_train_end: the export
    step (src.train calls it after fit) still writes the final state, the same bytes; an incomplete export (a file
    truncated or removed after the fact) is refused by publish and the published student kept."""
    straight = fit(teacher, shards, tmp_path / "a", 2)
    want = weights(export_and_publish(straight, tmp_path / "artifacts"))
    resumed = fit(teacher, shards, tmp_path / "b", 2, ckpt_path=tmp_path / "a" / "ckpt" / "last.ckpt")
    assert resumed.exported is None  # on_train_end did not run
    assert weights(export_and_publish(resumed, tmp_path / "artifacts")) == want  # deterministic model.pt bytes too
    exported = tmp_path / "b" / "export"  # the umask's mode (safetensors alone would make student.safetensors 0600)
    assert all((exported / n).stat().st_mode & 0o777 == file_mode() for n in WEIGHTS)
    student = tmp_path / "b" / "export" / "student.safetensors"
    data = student.read_bytes()
    student.unlink()  # a new file: the published version holds a hard link to the old one
    student.write_bytes(data[:100])
    with pytest.raises(ProvenanceError, match=f"{student} differs from what"):
        artifacts.publish(tmp_path / "b" / "export", tmp_path / "artifacts", STAGE.name)
    student.unlink()
    with pytest.raises(ProvenanceError, match=f"{student} is listed in .* but missing"):
        artifacts.publish(tmp_path / "b" / "export", tmp_path / "artifacts", STAGE.name)
    with pytest.raises(artifacts.ExportError, match="incomplete \\(missing .*student.safetensors"):
        artifacts.write_manifest(tmp_path / "b" / "export", OmegaConf.create({}), STAGE, {},
                                 required=resumed.exported)
    assert weights(tmp_path / "artifacts" / STAGE.name) == want


def test_model_pt_bytes_do_not_depend_on_the_file_name(tmp_path):
    states = {"generator": {"w": torch.arange(6.0)}}
    export_training_checkpoint(tmp_path / "a.pt", **states)
    export_training_checkpoint(tmp_path / "b.pt", **states)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()


def test_a_run_whose_generator_updates_were_all_skipped_exports_nothing(teacher, shards, tmp_path):
    """Generator iterations 0 and 2 both non-finite (skipped; max_consecutive_skips not reached): an error, not the
    initial weights exported as the student."""
    with pytest.raises(NonFiniteError, match=r"every generator update of this run \(2\) was skipped"):
        fit(teacher, shards, tmp_path, 3, callbacks=[InfLossAt([0, 2], loss="dmd_loss")],
            nonfinite={"max_consecutive_skips": 5})
    assert not (tmp_path / "export").exists()


# --------------------------------------------------------------------------------------------- the CLI


def test_killed_just_after_model_pt_then_resumed_publishes_a_complete_student(teacher, tmp_path):
    """The issue's run: killed (os._exit) just after model.pt is in place, before its checksum; resumed as documented
    from last.ckpt, already at max_steps: rc 0 and a complete, verified published student."""
    shards = tmp_path / "artifacts" / "toy" / "ode_pairs"
    write_pair_shards(shards, 6, SHAPE, per_shard=4)
    tiny = [o for o in TINY_OVERRIDES if not o.startswith("trainer.max_steps")]
    write_pair_manifest(shards, ["experiment=hiar_fkl", *tiny, "trainer.max_steps=3",
                                 f"world.teacher_checkpoint={teacher}", f"paths.root_dir={tmp_path}"])
    base = [sys.executable, "-m", "src.train", "experiment=hiar_fkl", *tiny, "trainer.max_steps=3",
            f"world.teacher_checkpoint={teacher}", f"paths.root_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([*base, "+callbacks.fault._target_=reliability_faults.ExitAtRename",
                             "+callbacks.fault.name=model.pt", "+callbacks.fault.after=true"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    export = tmp_path / "run" / "export"
    assert killed.returncode == 9 and sorted(p.name for p in export.iterdir()) == ["model.pt"], killed.stderr[-2000:]
    assert not (tmp_path / "artifacts" / "toy" / "hiar_fkl").exists()
    resumed = subprocess.run([*base, f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    published = tmp_path / "artifacts" / "toy" / "hiar_fkl"
    assert published.is_symlink() and set(WEIGHTS) <= {p.name for p in published.iterdir()}
    manifest = artifacts.verify_export(published)
    assert set(WEIGHTS) <= manifest["files"].keys() and all(verify_checksum(published / w) for w in WEIGHTS[::2])


# --------------------------------------------------------------------------------------------- publishing


def make_export(folder: Path, value: bytes) -> Path:
    folder.mkdir(parents=True)
    for name in ("a.bin", "b.bin"):
        (folder / name).write_bytes(value * 1000)
    artifacts.write_manifest(folder, OmegaConf.create({}), STAGE, {}, required=["a.bin", "b.bin"])
    return folder


def publish_many(export_dir: str, artifacts_dir: str, count: int) -> None:
    for _ in range(count):
        artifacts.publish(export_dir, artifacts_dir, STAGE.name)


def test_two_publishers_and_a_reader(tmp_path, monkeypatch):
    """2 processes x 50 publishes of two different exports: no error; a reader polling 1,000 times meanwhile always
    finds the stage, complete and verified. Afterwards nothing is left but the stage link, its lock and the versions a
    reader may still be in; once they are old, the next publish removes all but the current one and the last one."""
    monkeypatch.setattr(artifacts, "REPLACED_GRACE_S", 1.0)  # the forked publishers inherit it
    exports = [make_export(tmp_path / f"export{i}", bytes([i])) for i in range(2)]
    ids = {json.loads((e / MANIFEST).read_text())["id"] for e in exports}
    target = tmp_path / "artifacts"
    artifacts.publish(exports[0], target, STAGE.name)
    context = multiprocessing.get_context("fork")
    publishers = [context.Process(target=publish_many, args=(str(e), str(target), 50)) for e in exports]
    for p in publishers:
        p.start()
    seen, polls = set(), 0
    while polls < 1000:
        folder = artifacts.artifact_folder(target / STAGE.name)  # resolve the link once, then read that version
        manifest = artifacts.verify_artifact(folder)
        assert manifest is not None, f"poll {polls}: no stage at {target / STAGE.name}"
        assert json.loads((folder / PUBLISHED).read_text())["id"] == manifest["id"]
        seen.add(manifest["id"])
        polls += 1
    for p in publishers:
        p.join(60)
    assert [p.exitcode for p in publishers] == [0, 0]
    assert seen == ids  # the reader polled while both exports were being published
    assert sorted(p.name for p in target.iterdir()) == sorted([VERSIONS, STAGE.name, f".{STAGE.name}.lock"])
    time.sleep(1.1)
    artifacts.publish(exports[1], target, STAGE.name)
    versions = sorted((target / VERSIONS / STAGE.name).iterdir())
    assert len(versions) == 2 and (target / STAGE.name).resolve() == versions[-1]
    assert int(versions[-1].name.split("-")[0]) == 102  # numbered in publish order: 1 + 2 x 50 + 1


def test_publish_repairs_what_an_interrupted_one_left(tmp_path):
    """A stage folder published before stages were links, a folder swap of old killed between its renames (no stage,
    the previous folder aside in .old-*), temporaries, a dangling link: each repair leaves the stage readable and no
    leftovers. Published files follow the umask."""
    target = tmp_path / "artifacts"
    one, two = make_export(tmp_path / "one", b"1"), make_export(tmp_path / "two", b"2")
    stage = target / STAGE.name
    shutil.copytree(one, stage)
    artifacts.tidy_stage(target, STAGE.name)
    assert stage.is_symlink() and (stage / "a.bin").read_bytes() == b"1" * 1000 and artifacts.verify_export(stage)

    os.unlink(stage)
    shutil.rmtree(target / VERSIONS)
    shutil.copytree(one, target / f".{STAGE.name}{OLD_MARK}123-deadbeef")
    (target / f".{STAGE.name}{TMP_MARK}77-cafe").mkdir()  # the old scheme's temporary folder
    os.symlink("nowhere", target / f".{STAGE.name}{TMP_MARK}78-cafe")  # a temporary link
    artifacts.tidy_stage(target, STAGE.name)
    assert (stage / "a.bin").read_bytes() == b"1" * 1000 and artifacts.verify_export(stage)
    assert sorted(p.name for p in target.iterdir()) == [VERSIONS, STAGE.name]

    os.unlink(stage)
    os.symlink(f"{VERSIONS}/{STAGE.name}/000099-gone", stage)  # dangling
    mask = os.umask(0o027)
    try:
        artifacts.publish(two, target, STAGE.name)
    finally:
        os.umask(mask)
    assert (stage / "a.bin").read_bytes() == b"2" * 1000 and artifacts.verify_export(stage)
    assert all((stage / n).stat().st_mode & 0o777 == 0o640 for n in ("a.bin", MANIFEST, PUBLISHED))
    assert len(list((target / VERSIONS / STAGE.name).iterdir())) == 2  # the current one and the one it replaced
    (two / "a.bin").unlink()
    (two / MANIFEST).unlink()
    with pytest.raises(ProvenanceError, match="has no provenance.json"):
        artifacts.publish(two, target, STAGE.name)


# --------------------------------------------------------------------------------------------- full disk


@pytest.mark.parametrize("failure", ["torch", "oserror"])
def test_a_full_disk_says_so_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    """torch's own error on a full device ("unexpected pos" or "iostream error", by build; reproduced by writing to
    /dev/full) and a plain ENOSPC both become "no space left on device" with the path; the previous checkpoint and its
    checksum stay."""
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    save = torch.save

    def full(obj, f):
        if failure == "torch":
            save(obj, "/dev/full")  # the device that is always full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

    monkeypatch.setattr(checkpoint_io.torch, "save", full)
    with pytest.raises(DiskFullError, match=f"no space left on device: writing {path} failed .*the previous one is "
                                            "kept") as err:
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert torch.equal(read_checkpoint(path)["state_dict"]["w"], torch.ones(3)) and verify_checksum(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.sha256"]
    monkeypatch.setattr(Path, "write_text", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EDQUOT, "quota")))
    with pytest.raises(DiskFullError, match=f"writing {tmp_path / 'new.txt'} failed .*nothing was written"):
        atomic_write_text(tmp_path / "new.txt", "x")


# --------------------------------------------------------------------------------------------- smaller items


def test_rebuild_hint_carries_a_differing_teacher(teacher, tmp_path):
    """ODE pairs made with another teacher: the hint to rebuild them names the teacher the consumer runs with (the key
    the user sets, not the interpolation that reads it)."""
    other = tmp_path / "other.safetensors"
    overrides = ["experiment=hiar_fkl", f"paths.root_dir={tmp_path}", "task.generator_init=null"]
    shards = tmp_path / "artifacts" / "toy" / "ode_pairs"
    write_pair_shards(shards, 2, SHAPE, per_shard=2)
    write_pair_manifest(shards, [*overrides, f"world.teacher_checkpoint={teacher}"])
    torch.save({"w": torch.ones(1)}, other)  # other weights
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"world.teacher_checkpoint={other}"])
    with pytest.raises(ProvenanceError, match=f"rebuild it with: python -m src.train experiment=ode_pairs "
                                              f"world.teacher_checkpoint={other}"):
        artifacts.check_inputs(cfg)


def test_critic_only_rows_leave_the_generator_losses_empty(teacher, shards, tmp_path):
    fit(teacher, shards, tmp_path, 3, logger=CSVLogger(tmp_path, name="csv"))
    rows = [r for r in csv.DictReader(next(tmp_path.glob("csv/version_*/metrics.csv")).open()) if r["train/critic"]]
    assert len(rows) == 3  # iterations 0 and 2 update the generator, 1 only the critic
    assert all(rows[i]["train/dmd"] and rows[i]["train/fkl"] and rows[i]["train/exit_step"] for i in (0, 2))
    assert rows[1]["train/dmd"] == rows[1]["train/fkl"] == rows[1]["train/exit_step"] == ""


def test_resume_from_a_missing_last_ckpt_takes_the_newest_periodic_one(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for i, name in enumerate(["iteration-000004.ckpt", "iteration-000002.ckpt"]):  # written in that order
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(1)}}, folder / name)
        os.utime(folder / name, ns=(10**18 + i * 10**9, 10**18 + i * 10**9))
    with caplog.at_level(logging.WARNING):
        assert resume_path(str(folder / "last.ckpt")) == str(folder / "iteration-000002.ckpt")
    assert "last.ckpt not found: resuming from the newest periodic checkpoint" in caplog.text
    os.symlink("iteration-000009.ckpt", folder / "last.ckpt")  # a link whose target is gone
    assert resume_path(str(folder / "last.ckpt")) == str(folder / "iteration-000002.ckpt")
    assert resume_path(str(folder / "iteration-000004.ckpt")) == str(folder / "iteration-000004.ckpt")
    assert resume_path(str(tmp_path / "last.ckpt")) == str(tmp_path / "last.ckpt")  # nothing to fall back to
