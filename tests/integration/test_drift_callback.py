"""DriftCallback: identical training with and without it (RNG isolation), logged numbers and files."""

import json
import random

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from callbacks.drift import DriftCallback, rng_fence
from src.video_io import pixel_format, read_video


class TinyModule(L.LightningModule):
    """Implements the DriftSampler protocol; its training and its sampler both draw from every global RNG."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
        self.losses = []

    def training_step(self, batch, batch_idx):
        (x,) = batch
        noise = torch.randn_like(x) * random.random() * float(np.random.rand())
        loss = self.net(x + noise).pow(2).mean()
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def sample_videos(self, prompts, num_frames, seed):
        # deliberately uses the global generators (the callback must fence them off); a fading red video per prompt
        random.random(), np.random.rand(3), torch.rand(5)
        level = torch.linspace(1.0, 0.3, num_frames) + 0.01 * torch.rand(num_frames)
        video = torch.stack([torch.tensor([v, 0.1, 0.1]).view(3, 1, 1).expand(3, 8, 8) for v in level]) * 2 - 1
        return video.expand(len(prompts), *video.shape).clone()


def train(tmp_path, callbacks):
    L.seed_everything(0)
    module = TinyModule()
    data = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=8, shuffle=True)
    trainer = L.Trainer(
        max_steps=6, callbacks=callbacks, logger=CSVLogger(tmp_path, name="csv"), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
    )
    trainer.fit(module, data)
    return module.losses, trainer


def test_callback_does_not_change_training(tmp_path):
    base, _ = train(tmp_path / "a", [])
    callback = DriftCallback(prompts=["a red circle moving left on a black background", "p2"], every_n_steps=2,
                             num_frames=10, fps=4.0)
    with_cb, trainer = train(tmp_path / "b", [callback])
    assert len(base) == 6 and base == with_cb

    step_dirs = sorted(d for d in (tmp_path / "b" / "csv" / "version_0" / "drift").iterdir() if d.is_dir())
    assert [d.name for d in step_dirs] == ["step_0000002", "step_0000004", "step_0000006"]
    metrics = json.loads((step_dirs[0] / "metrics.json").read_text())
    assert metrics["drift/score"] > 0 and metrics["drift/slope_hsv_saturation"] < 0  # (v - 0.1) / v falls
    assert (step_dirs[0] / "segments.png").stat().st_size > 1000
    # all prompts in one grid video (2 prompts of 8 x 8 -> 8 x 17, upscaled x32), yuv420p so that browsers play it
    frames, fps = read_video(step_dirs[0] / "samples.mp4")
    assert frames.shape == (10, 3, 8 * 32, 17 * 32) and fps == 4.0
    assert pixel_format(step_dirs[0] / "samples.mp4") == "yuv420p"
    history = json.loads((step_dirs[0].parent / "history.json").read_text())
    assert [h["step"] for h in history] == [2, 4, 6] and (step_dirs[0].parent / "history.png").is_file()
    logged = (tmp_path / "b" / "csv" / "version_0" / "metrics.csv").read_text()
    assert "drift/score" in logged and "drift/motion_proxy_frame_diff" in logged


def test_samples_are_reproducible_and_fenced():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before = (random.random(), float(np.random.rand()), torch.rand(1).item())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with rng_fence(seed=7):
        a = torch.rand(3)
        random.random(), np.random.rand()
    with rng_fence(seed=7):
        b = torch.rand(3)
    assert torch.equal(a, b)
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == before


def test_module_without_protocol_is_refused(tmp_path):
    class Plain(TinyModule):
        sample_videos = None

    callback = DriftCallback(prompts=["p"], every_n_steps=1, num_frames=10)
    with pytest.raises(TypeError, match="sample_videos"):
        callback.setup(L.Trainer(logger=False, accelerator="cpu", devices=1), Plain(), "fit")


def test_fires_when_the_step_count_jumps_over_a_multiple(tmp_path):
    """A distillation iteration takes 2 optimizer steps every gen_update_ratio-th time: 6 -> 8 skips 7."""
    callback = DriftCallback(prompts=["p"], every_n_steps=7, num_frames=4)
    fired = []
    callback.evaluate = lambda trainer, module, step: fired.append(step)

    class Trainer:
        is_global_zero = True
        strategy = type("S", (), {"barrier": staticmethod(lambda name: None)})()

    for step in (2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 14, 15):
        Trainer.global_step = step
        callback.on_train_batch_end(Trainer, None, None, None, 0)
    assert fired == [8, 14]


def test_schedule_is_printed_and_a_run_too_short_is_warned_about(caplog):
    class Trainer:
        is_global_zero, global_step, max_steps = True, 0, 300

    callback = DriftCallback(prompts=["p"], every_n_steps=150, num_frames=4)
    with caplog.at_level("INFO", logger="callbacks.drift"):
        callback.on_train_start(Trainer, None)
    assert "at optimizer steps 150, 300 (2 evaluations)" in caplog.text
    caplog.clear()
    Trainer.max_steps = 10
    with caplog.at_level("INFO", logger="callbacks.drift"):
        callback.on_train_start(Trainer, None)
    assert "callbacks.drift.every_n_steps=150 > the 10 optimizer steps left" in caplog.text
    assert caplog.records[-1].levelname == "WARNING"


def test_wandb_media_sit_at_the_optimizer_step(tmp_path, monkeypatch):
    """wandb gets one row per evaluation holding the scalars, the plots and the video with trainer/global_step (media
    logged alone would sit at wandb's own step); and every score is of clamped pixels, as a video file holds."""
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "disabled")
    rows, defined = [], []
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    logger._experiment = type("Run", (), {"log": lambda self, row, **kw: rows.append((row, kw)),
                                          "define_metric": lambda self, *a, **kw: defined.append((a, kw))})()
    callback = DriftCallback(prompts=["a red circle moving left on a black background"], every_n_steps=2,
                             num_frames=15, fps=4.0, oracle=True)

    class Loud(TinyModule):
        def sample_videos(self, prompts, num_frames, seed):
            return super().sample_videos(prompts, num_frames, seed) * 3  # a decoder overshooting [-1, 1]

    trainer = type("T", (), {"loggers": [logger], "log_dir": str(tmp_path), "is_global_zero": True})()
    loud = callback.evaluate(trainer, Loud(), 4)
    row, kwargs = rows[-1]
    assert row["trainer/global_step"] == 4 and not kwargs  # no wandb step of its own
    assert {"drift/segments", "drift/history", "drift/samples", "drift/score"} <= set(row)
    assert defined == [(("drift/*",), {"step_metric": "trainer/global_step"})]
    class Clamped(Loud):
        def sample_videos(self, prompts, num_frames, seed):
            return super().sample_videos(prompts, num_frames, seed).clamp(-1, 1)

    clamped = callback.evaluate(trainer, Clamped(), 6)
    assert repr(sorted(loud.items())) == repr(sorted(clamped.items()))  # NaN-safe
