"""The researcher's workflow through the real CLI on a tiny toy world: the stage chain, the README's sweep from another
directory with no path override, concurrent runs, publishing rules and checked provenance."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from src import artifacts

from helpers import CONF, PAIRS, ROOT, STUDENT, cli, project_with_pairs, save_tiny_teacher

README_SWEEP = "python -m src.train -m experiment=hiar_fkl fkl.weight=0,0.1"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project root with published ODE pairs, made from another directory; returns (root, overrides, that dir)."""
    root, elsewhere = tmp_path_factory.mktemp("project"), tmp_path_factory.mktemp("elsewhere")
    return root, project_with_pairs(root, elsewhere), elsewhere


def published(root: Path, stage: str) -> dict:
    folder = root / "artifacts" / "toy" / stage
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_chain_sweep_concurrency_and_publishing(project):
    root, tiny, elsewhere = project
    shards = root / "artifacts/toy/ode_pairs"
    assert sorted(p.name for p in shards.glob("ode-*.tar")) == ["ode-000000.tar", "ode-000001.tar"]
    pairs = json.loads((shards / "provenance.json").read_text())
    assert pairs["settings"]["guidance"] == 4.0 and pairs["settings"]["num_frames"] == 9
    assert json.loads((shards / "published.json").read_text())["run_dir"] == pairs["run_dir"]

    # two ode_init runs at once: separate run folders, each with its complete export; one of them is published
    procs = [cli(["-m", "src.train", "experiment=ode_init", *tiny, f"seed={s}"], root, elsewhere, wait=False)
             for s in (1, 2)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    runs = sorted((root / "logs/ode_init/runs").iterdir())
    assert len(runs) == 2
    for run in runs:
        manifest = json.loads((run / "export/provenance.json").read_text())
        assert manifest["run_dir"] == str(run) and manifest["inputs"]["ode_pairs"]["id"] == pairs["id"]
        assert artifacts.verify_artifact(run / "export/ode_init.safetensors") == manifest
        assert (run / "config.yaml").is_file() and "ode_init" in (run / "config.yaml").read_text()
    init = json.loads((root / "artifacts/toy/ode_init/provenance.json").read_text())
    assert init["run_dir"] in {str(r) for r in runs}
    assert (root / "artifacts/toy/ode_init/ode_init.safetensors").read_bytes() == \
        (Path(init["run_dir"]) / "export/ode_init.safetensors").read_bytes()

    # the README's sweep as written (plus tiny sizes), from another directory, no path overridden: two jobs, two
    # students, nothing published
    before = {s: published(root, s) for s in ("ode_pairs", "ode_init")}
    code, out, err = cli([*README_SWEEP.split()[1:], *tiny, *STUDENT], root, elsewhere)
    jobs = sorted((root / "logs/hiar_fkl/multiruns").glob("*/*/export/student.safetensors"))
    assert len(jobs) == 2 and jobs[0].read_bytes() != jobs[1].read_bytes()
    weights = sorted(json.loads((j.parent / "provenance.json").read_text())["settings"]["fkl"]["weight"] for j in jobs)
    assert weights == [0.0, 0.1]
    assert not (root / "artifacts/toy/hiar_fkl").exists()
    assert all("not published: a sweep job" in (j.parents[1] / "train.log").read_text() for j in jobs)
    assert not list(elsewhere.iterdir())  # nothing written where the command ran

    # fast_dev_run leaves the published artifacts untouched
    cli(["-m", "src.train", "experiment=hiar_fkl", "debug=fdr", *tiny, *STUDENT], root, elsewhere)
    assert {s: published(root, s) for s in ("ode_pairs", "ode_init")} == before
    assert not (root / "artifacts/toy/hiar_fkl").exists()

    # another ODE-pair setting: hiar_fkl refuses the old shards, naming the difference and the command
    code, _, err = cli(["-m", "src.train", "experiment=hiar_fkl", *tiny, *STUDENT, "ode_pairs.guidance=3.0"], root,
                       elsewhere, check=False)
    assert code != 0
    assert "ode_pairs.guidance: made with 4.0, this run expects 3.0" in err
    assert "python -m src.train experiment=ode_pairs ode_pairs.guidance=3.0" in err

    # re-running ode_pairs with it replaces the shards, and then the ODE init made from the old ones is refused
    cli(["-m", "src.train", "experiment=ode_pairs", *tiny, *PAIRS, "ode_pairs.guidance=3.0"], root, elsewhere)
    assert json.loads((shards / "provenance.json").read_text())["settings"]["guidance"] == 3.0
    code, _, err = cli(["-m", "src.train", "experiment=hiar_fkl", *tiny, *STUDENT, "ode_pairs.guidance=3.0"], root,
                       elsewhere, check=False)
    assert code != 0 and "refuses ode_init" in err and "python -m src.train experiment=ode_init" in err


def test_missing_stage_and_missing_experiment_each_give_one_line(tmp_path):
    teacher = f"world.teacher_checkpoint={ROOT / 'assets' / 'toy_teacher.safetensors'}"  # the root here is tmp_path
    missing_stage = cli(["-m", "src.train", "experiment=ode_init", "trainer.max_steps=1", teacher], tmp_path, tmp_path,
                        wait=False)
    no_experiment = cli(["-m", "src.train"], tmp_path, tmp_path, wait=False)  # both at once: start-up dominates
    _, err = missing_stage.communicate(timeout=600)
    assert missing_stage.returncode != 0
    assert "ode_init needs 1 stage output(s) that do not exist" in err
    assert f"1. ode_pairs (expected at {tmp_path}/artifacts/toy/ode_pairs): python -m src.train experiment=ode_pairs" in err
    _, err = no_experiment.communicate(timeout=600)
    assert no_experiment.returncode != 0 and err.strip().splitlines()[-1] == (
        "error: choose a stage: python -m src.train experiment=<hiar|hiar_fkl|ode_init|ode_pairs|self_forcing|teacher_toy|"
        "teacher_toy_anneal>")


def test_root_comes_from_the_marker_not_the_working_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HIAR_ROOT"}
    env["PYTHONPATH"] = str(ROOT)
    code = "import os, src; print(os.environ['HIAR_ROOT'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.stdout.strip() == str(ROOT)
    assert artifacts.find_root(ROOT / "src" / "models") == ROOT


def compose_train(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("group", ["trainer=cpu", "trainer=gpu", "trainer=ddp", "debug=fdr", "debug=overfit",
                                   "debug=limit", "debug=profile", "fkl=causal", "steps=two", "blocks=f1"])
def test_presets_compose(group):
    cfg = compose_train("experiment=hiar_fkl", group)
    assert cfg.stage == "student"
    if group == "trainer=ddp":
        assert cfg.trainer.strategy._target_.endswith("GradSyncDDPStrategy")
    if group.startswith("debug="):
        assert cfg.publish is False


def test_slurm_launcher_config_composes():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=hiar_fkl", "hydra/launcher=submitit_slurm"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.tasks_per_node == launcher.gpus_per_node


def test_stale_reason_follows_settings_and_upstream(tmp_path):
    """src.demo rebuilds exactly what changed: a stage whose settings changed, and every stage downstream of it."""
    teacher = save_tiny_teacher(tmp_path / "teacher.safetensors")
    base = [f"world.teacher_checkpoint={teacher}", f"paths.artifacts_dir={tmp_path / 'artifacts'}"]
    published_dir = tmp_path / "artifacts"

    def build(stage, *overrides):
        cfg = compose_train(f"experiment={stage}", *base, *overrides, f"paths.output_dir={tmp_path / 'runs' / stage}")
        export = tmp_path / "runs" / stage / "export"
        export.mkdir(parents=True, exist_ok=True)
        (export / "weights.bin").write_bytes(os.urandom(16))
        used = {n: artifacts.read_manifest(published_dir / n) for n in artifacts.stage_of(cfg).inputs}
        artifacts.write_manifest(export, cfg, artifacts.stage_of(cfg), used)
        artifacts.publish(export, published_dir, stage)

    def stale(stage, *overrides):
        return artifacts.stale_reason(compose_train(f"experiment={stage}", *base, *overrides))

    assert stale("ode_pairs") == "not built yet"
    build("ode_pairs")
    build("ode_init")
    build("hiar_fkl")
    assert [stale(s) for s in ("ode_pairs", "ode_init", "hiar_fkl")] == [None, None, None]
    assert stale("hiar_fkl", "fkl.weight=0.2") == "fkl: {\"attention\":\"bidirectional\",\"num_steps\":1," \
        "\"weight\":0.1} -> {\"attention\":\"bidirectional\",\"num_steps\":1,\"weight\":0.2}"
    assert stale("ode_init", "world.training.ode_init_steps=7") == "trainer.max_steps: 200 -> 7"
    assert stale("ode_pairs", "ode_pairs.guidance=3.0") == "task.guidance: 4.0 -> 3.0"
    build("ode_pairs", "ode_pairs.guidance=3.0")
    assert stale("ode_init", "ode_pairs.guidance=3.0") == "ode_pairs was rebuilt"
    assert stale("hiar_fkl", "ode_pairs.guidance=3.0") == "ode_pairs was rebuilt"
