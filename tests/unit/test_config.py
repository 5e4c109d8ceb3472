"""How the composed config wires the pieces: each default has one home, the data module takes the task's settings by
interpolation, and each experiment declares the stage it runs."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from src import artifacts
from src.training.distill import DistillTask, yaml_settings

from helpers import CONF, SAMPLER, tiny_world


def compose_train(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("world", ["toy", "wan2.1_1.3b"])
def test_the_distillation_stream_takes_the_task_settings(world):
    cfg = compose_train("experiment=hiar_fkl", f"world={world}", "trainer.devices=1")
    data, task = cfg.data, cfg.task
    assert (data.gen_update_ratio, data.grad_accumulation, data.fkl_weight) == \
        (task.gen_update_ratio, task.grad_accumulation, task.fkl.weight)
    assert task.gen_update_ratio == cfg.world.training.gen_update_ratio
    off = compose_train("experiment=hiar", f"world={world}", "trainer.devices=1")
    assert off.data.fkl_weight == 0.0


@pytest.mark.parametrize("experiment,stage", [("ode_pairs", "ode_pairs"), ("ode_init", "ode_init"),
                                              ("hiar_fkl", "student"), ("hiar", "student"),
                                              ("self_forcing", "student"), ("teacher_toy", "teacher")])
def test_each_experiment_declares_its_stage(experiment, stage):
    cfg = compose_train(f"experiment={experiment}")
    assert cfg.stage == stage
    found = artifacts.stage_of(cfg)
    assert (found is None) == (stage == "teacher")
    if found is not None:
        assert found.name == (stage if stage != "student" else experiment)


def test_distill_settings_have_one_home(teacher_file):
    """Keys a caller leaves out take conf/task/distill.yaml's (conf/fkl/bidirectional.yaml's) values; the world's keys
    have no value but the world's and must be given."""
    yaml = OmegaConf.load(f"{CONF}/task/distill.yaml")
    settings = yaml_settings()
    numerics = OmegaConf.load(f"{CONF}/numerics/default.yaml").numerics  # the keys the numerics group sets
    assert settings["dmd"] == {**OmegaConf.to_container(yaml.dmd), "sigma_lookup": numerics.sigma_lookup}
    assert settings["optim"] == {"betas": [0.0, 0.999], "weight_decay": 0.01, "grad_clip": 10.0}
    assert settings["fkl"] == OmegaConf.to_container(OmegaConf.load(f"{CONF}/fkl/bidirectional.yaml"))
    assert "start" not in settings["ema"] and "lr_generator" not in settings["optim"]
    task = DistillTask(world=tiny_world(teacher_file), sampler=SAMPLER, num_frames=9,
                       optim={"lr_generator": 1e-3, "lr_critic": 2e-3}, ema={"start": 5}, dmd={"guidance": 4.0})
    hp = task.hparams
    assert hp.dmd == {**settings["dmd"], "guidance": 4.0} and hp.nonfinite == settings["nonfinite"]
    assert hp.optim == {**settings["optim"], "lr_generator": 1e-3, "lr_critic": 2e-3}
    assert hp.ema == {"device": None, "decay": settings["ema"]["decay"], "start": 5}
    with pytest.raises(ValueError, match="task.optim.lr_critic, task.ema.start not set"):
        DistillTask(world=tiny_world(teacher_file), sampler=SAMPLER, num_frames=9, optim={"lr_generator": 1e-3})
