"""Every `debug=` preset (conf/debug) runs on every training stage at tiny sizes, and does what it says: fdr one batch,
limit a short run with checkpoints and a metrics.csv, overfit one repeated batch, profile a printed table. None
publishes."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from src.train import train

from helpers import CONF, PAIRS, STUDENT, save_tiny_teacher, tiny_world_overrides

STAGES = {"teacher_toy": ["data.source=procedural", "data.batch_size=2", "data.num_frames=5", "data.warmup_frames=3",
                          "task.clip_frames=[3,5]", "task.init_weights=null"],
          "ode_pairs": PAIRS, "ode_init": [], "hiar_fkl": STUDENT}
PRESETS = ["fdr", "limit", "overfit", "profile"]
QUIET = ["trainer.enable_model_summary=false"]


def config(root: Path, run: str, overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        return compose("train", overrides=[*overrides, f"paths.root_dir={root}", f"paths.log_dir={root}/logs",
                                           f"paths.output_dir={root}/runs/{run}", *QUIET])


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny world with its ODE pairs and ODE init published (the inputs of the later stages)."""
    root = tmp_path_factory.mktemp("debug")
    tiny = tiny_world_overrides(save_tiny_teacher(root / "teacher.safetensors"))
    train(config(root, "pairs", ["experiment=ode_pairs", *tiny, *PAIRS]))
    train(config(root, "init", ["experiment=ode_init", *tiny]))
    return root, tiny


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("stage", list(STAGES))
def test_debug_preset_runs_on_every_stage(project, stage, preset, capsys):
    root, tiny = project
    published = sorted(p.name for p in (root / "artifacts" / "toy").iterdir())
    # limit, overfit and profile cut to 6 optimizer steps here (their own 10 / 60 / 20 are for real worlds)
    steps = [] if preset == "fdr" else ["trainer.max_steps=6"]
    run = root / "runs" / f"{stage}-{preset}"
    train(config(root, run.name, [f"experiment={stage}", *tiny, *STAGES[stage], f"debug={preset}", *steps]))
    assert sorted(p.name for p in (root / "artifacts" / "toy").iterdir()) == published  # never published
    fit = stage != "ode_pairs"
    if preset == "limit" and fit:
        assert sorted(p.name for p in (run / "checkpoints").glob("iteration-*.ckpt"))  # every_n_iterations: 5
        rows = (run / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
        assert len(rows) >= 3  # a header, then a row per iteration (log_every_n_steps: 1)
    if preset == "profile":
        assert "Profiler Report" in capsys.readouterr().out
        assert list(run.glob("*profile*.txt"))


def test_a_run_shorter_than_the_logging_interval_writes_metrics_csv(project):
    """2 optimizer steps against trainer.log_every_n_steps=10: still a metrics.csv, at the path the README names."""
    root, tiny = project
    train(config(root, "short", ["experiment=ode_init", *tiny, "trainer.max_steps=2", "publish=false"]))
    rows = (root / "runs" / "short" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    assert "step" in rows[0].split(",") and len(rows) >= 2  # the header, then rows (log_every_n_steps 1 here)
