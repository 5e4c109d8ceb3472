"""Teacher: flow-matching steps lower the loss, the ODE sampler is seeded, training resumes, the Hydra experiment runs."""

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

from src.checkpoints import CheckpointError
from src.flow_matching import euler_grid
from src.sampling.ode import sample_ode, sample_videos
from src.train import train
from src.training.teacher import export_teacher, load_teacher, lr_factor, save_teacher
from src.worlds.toy.data import ToyVideoDataModule
from src.worlds.toy.shapes import prompt_from_attributes, render_video

from helpers import CONF, tiny_teacher_task

ATTRS = {"shape": "square", "color": "yellow", "background": "black", "direction": "up"}


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    task = tiny_teacher_task(text_dropout=0.0)
    pixels = torch.stack([render_video(ATTRS, 3, 16, 16, seed=i) for i in range(2)])
    prompts = [prompt_from_attributes(ATTRS)] * 2

    def fixed_loss():  # the same 4 draws (iterations 1000..1003) each time
        with torch.no_grad():
            return float(sum(task.flow_matching_loss(pixels, prompts, 1000 + i) for i in range(4)))

    before = fixed_loss()
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=1e-2)
    for iteration in range(10):
        optimizer.zero_grad()
        task.flow_matching_loss(pixels, prompts, iteration).backward()
        optimizer.step()
    assert fixed_loss() < 0.8 * before


def test_training_noise_levels_follow_the_sampler_shift():
    normal = torch.randn(20_000, generator=torch.Generator().manual_seed(0))
    unshifted = tiny_teacher_task().timesteps(normal) / 1000
    shifted = tiny_teacher_task(timestep_shift=8.0).timesteps(normal) / 1000
    assert abs(unshifted.median() - 0.5) < 0.02  # logit-normal(0, 1): median sigma 1/2
    assert abs(shifted.median() - 8 * 0.5 / (1 + 7 * 0.5)) < 0.02  # the shift maps the median like the sampler's grid
    band = lambda s: ((s > 0.93) & (s < 0.99)).float().mean()  # where the prompted direction is decided
    assert band(unshifted) < 0.01 and band(shifted) > 0.25


def test_ode_sampler_is_seeded_and_returns_states():
    task = tiny_teacher_task()
    model = task.model.eval()
    context, _ = task.text_encoder.encode(["a red circle moving left on a black background"] * 2)
    uncond, _ = task.text_encoder.encode([""])
    kwargs = {"shape": (2, 3, 12, 8, 8), "uncond_context": uncond, "num_steps": 4, "shift": 8.0, "guidance_scale": 6.0}
    first = sample_ode(model, context, generator=torch.Generator().manual_seed(1), **kwargs)
    again, states = sample_ode(model, context, generator=torch.Generator().manual_seed(1), return_states_at=[0, 2, 4],
                               **kwargs)
    other = sample_ode(model, context, generator=torch.Generator().manual_seed(2), **kwargs)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert sorted(states) == [0, 2, 4] and torch.equal(states[4], first)
    noise = torch.randn(2, 3, 12, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(states[0], noise)
    assert torch.equal(sample_ode(model, context, noise=noise, **{k: v for k, v in kwargs.items() if k != "shape"}), first)
    assert euler_grid(4, 8.0)[0] == 1000 and euler_grid(4, 8.0)[-1] == 0
    videos = sample_videos(model, task.text_encoder, task.codec, ["a red circle moving left on a black background"], 3,
                           (12, 8, 8), seed=0, num_steps=2)
    assert videos.shape == (1, 3, 3, 16, 16) and videos.abs().max() <= 1


def _fit(task, root: Path, max_steps: int, ckpt_path=None):
    trainer = L.Trainer(max_steps=max_steps, default_root_dir=root, logger=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[EMAWeightAveraging(decay=0.9),
                                   ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, every_n_train_steps=2)])
    data = ToyVideoDataModule(source="procedural", num_frames=3, batch_size=2)
    trainer.fit(task, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def test_training_resumes_from_its_checkpoint_and_exports(tmp_path):
    torch.manual_seed(0)
    _fit(tiny_teacher_task(), tmp_path, max_steps=2)
    last = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2 and "current_model_state" in checkpoint
    resumed = _fit(tiny_teacher_task(), tmp_path, max_steps=4, ckpt_path=str(last))
    assert resumed.global_step == 4

    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 4
    exported = export_teacher(last, tmp_path / "teacher.safetensors")
    teacher = load_teacher(exported)
    ema = {k[len("model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    raw = {k[len("model."):]: v for k, v in checkpoint["current_model_state"].items() if k.startswith("model.")}
    assert teacher.cfg.dim == 32 and all(torch.equal(v, ema[k]) for k, v in teacher.state_dict().items())
    assert not all(torch.equal(v, raw[k]) for k, v in teacher.state_dict().items())  # EMA, not the raw weights
    from_checkpoint = load_teacher(last)  # the same EMA weights, read straight from the Lightning checkpoint
    assert all(torch.equal(v, ema[k]) for k, v in from_checkpoint.state_dict().items())


def test_hydra_experiment_composes_and_trains(tmp_path):
    overrides = [
        "experiment=teacher_toy",
        *[f"world.teacher.{k}={v}" for k, v in
          {"dim": 32, "ffn_dim": 64, "freq_dim": 32, "num_heads": 2, "num_layers": 1}.items()],
        "data.source=procedural", "data.batch_size=2", "data.num_frames=5", "data.warmup_frames=3",
        "task.clip_frames=[3,5]", "task.init_weights=null",  # the shipped v1 teacher is another size
        "trainer.max_steps=2", "~callbacks.progress", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run", f"paths.data_dir={tmp_path}/data",
        f"paths.log_dir={tmp_path}/logs",
    ]
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        cfg = compose(config_name="train", overrides=overrides)
    metrics = train(cfg)
    assert "train/loss" in metrics
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_training_can_start_from_an_earlier_teacher(tmp_path):
    earlier = tiny_teacher_task().model
    save_teacher(earlier, tmp_path / "earlier.safetensors")
    task = tiny_teacher_task(init_weights=str(tmp_path / "earlier.safetensors"))
    assert all(torch.equal(v, earlier.state_dict()[k]) for k, v in task.model.state_dict().items())
    with pytest.raises(CheckpointError, match="earlier.safetensors"):  # another architecture: named, before training
        tiny_teacher_task({"dim": 64, "ffn_dim": 128}, init_weights=str(tmp_path / "earlier.safetensors"))


def test_lr_warms_up_then_stays_or_follows_a_cosine():
    constant = [lr_factor(s, warmup_steps=4, total_steps=None, min_lr_ratio=1.0) for s in range(10)]
    assert constant == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    cosine = [lr_factor(s, warmup_steps=2, total_steps=6, min_lr_ratio=0.1) for s in range(8)]
    assert cosine[:3] == [0.5, 1.0, 1.0]
    assert cosine[4] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert cosine[6] == pytest.approx(0.1) and cosine[7] == pytest.approx(0.1)  # floor at and after max_steps
    assert all(a >= b for a, b in zip(cosine[1:], cosine[2:]))


def test_teacher_anneal_experiment_continues_v2_with_a_cosine():
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        cfg = compose(config_name="train", overrides=["experiment=teacher_toy_anneal"])
    assert cfg.task.init_weights.endswith("assets/toy_teacher_v2.safetensors")
    assert Path(cfg.task.init_weights).exists() and cfg.task.min_lr_ratio < 1 and cfg.trainer.max_steps == 2000
    assert cfg.task.timestep_shift == 8.0 and cfg.seed != 0  # the first stage's noise levels, fresh draws
