"""Every N training steps: sample long videos for a fixed prompt set, compute drift, log scalars, a video and a plot.

Protocol the LightningModule implements (`DriftSampler`), so this callback knows nothing of sampler internals:

    def sample_videos(self, prompts: list[str], num_frames: int, seed: int) -> torch.Tensor:
        '''Pixels [B, T, 3, H, W] in [-1, 1] for the prompts: `num_frames` latent frames (81 ~ 20 s in Wan),
        in the order the module trains in, EMA weights when the module keeps them, all noise drawn from a private
        torch.Generator seeded with `seed`.'''

The callback calls it under `torch.no_grad()` with the module in eval mode (train mode restored afterwards), on global
rank 0 only (other ranks wait at a barrier; a sharded strategy whose forward needs every rank cannot use it), and
inside an RNG fence: the python, numpy, torch CPU and CUDA random states are saved before and restored after, and
the torch global seed is set to `seed` inside the fence, so a module that draws from the global generator still gets
reproducible samples and a run with the callback has the same loss curve as one without.

It runs when the optimizer-step count crosses a multiple of `every_n_steps` (a distillation iteration takes 1 or 2
steps, so the count can jump over an exact multiple) and prints a line when it starts and ends.

Logged: `drift/*` scalars to every logger (the combined drift, per-measure slopes, the first/last imaging-quality
gap when MUSIQ is available, the frame-difference motion proxy, the toy-world oracle and VBench dimensions when
enabled); one grid video of every prompt (src.video_io's writer: yuv420p, upscaled), the per-segment plot
(seconds on the x-axis) and the drift score over training steps to WandbLogger / TensorBoardLogger. Files (plots,
`samples.mp4`, JSON of the numbers) go to `<trainer.log_dir or default_root_dir>/drift/step_<N>/` for every logger,
`history.json` / `history.png` to `drift/`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import lightning as L
import matplotlib.pyplot as plt
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from evaluation.drift import MOTION_PROXY_NAME, video_drift
from evaluation.models import DRIFT_MEASURES, load_measures
from evaluation.report import jsonable, segment_figure, summarise_method
from evaluation.vbench_runner import (
    CUSTOM_DIMENSIONS,
    DEFAULT_PYTHON,
    LONG_VIDEO_S,
    check_vbench,
    default_cache_dir,
    run_vbench,
)
from src.video_io import grid, upscale_factor, view_frames, write_video

log = logging.getLogger(__name__)


@runtime_checkable
class DriftSampler(Protocol):
    def sample_videos(self, prompts: list[str], num_frames: int, seed: int) -> torch.Tensor: ...


@contextlib.contextmanager
def rng_fence(seed: int) -> Iterator[None]:
    """Save python / numpy / torch / CUDA RNG states, seed torch with `seed`, restore everything on exit."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class DriftCallback(L.Callback):
    def __init__(
        self,
        prompts: Sequence[str],
        every_n_steps: int = 1000,
        num_frames: int = 81,
        fps: float = 16.0,
        seed: int = 0,
        segments: int = 5,
        weights_dir: str | None = None,
        measures: Sequence[str] = DRIFT_MEASURES,
        drift_weights: dict[str, float] | None = None,
        device: str | None = None,
        oracle: bool = False,
        vbench: bool = False,
        vbench_python: str = DEFAULT_PYTHON,
        vbench_cache_dir: str | None = None,
        vbench_dimensions: Sequence[str] = CUSTOM_DIMENSIONS,
    ) -> None:
        if not prompts:
            raise ValueError("DriftCallback needs at least one prompt")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.prompts = list(prompts)
        self.every_n_steps = every_n_steps
        self.num_frames = num_frames
        self.fps = float(fps)
        self.seed = seed
        self.segments = segments
        self.weights_dir = weights_dir
        self.measure_names = tuple(measures)
        self.drift_weights = dict(drift_weights) if drift_weights is not None else None
        self.device = device
        self.oracle = oracle
        self.vbench = vbench
        self.vbench_python = vbench_python
        self.vbench_cache_dir = Path(vbench_cache_dir).expanduser() if vbench_cache_dir else default_cache_dir()
        self.vbench_dimensions = list(vbench_dimensions)
        self._measures = None
        self._unavailable: dict[str, str] = {}
        self._last_step = 0
        self.history: list[dict[str, float]] = []

    # -- set-up: fail early, before hours of training ------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, DriftSampler):
            raise TypeError(
                f"{type(pl_module).__name__} does not implement sample_videos(prompts, num_frames, seed) -> "
                "pixels [B, T, 3, H, W]; DriftCallback needs it (see callbacks/drift.py)"
            )
        if trainer.is_global_zero:
            if self.vbench:
                check_vbench(self.vbench_dimensions, self.vbench_cache_dir, self.vbench_python)
            if self.oracle:
                from src.worlds.toy import oracle  # noqa: F401  (fails now rather than at the first evaluation)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Say when the evaluation will run, and warn when the run is too short for it to run at all."""
        if not trainer.is_global_zero:
            return
        start, end = trainer.global_step, trainer.max_steps
        if end is None or end < 0:
            log.info("drift: every %d optimizer steps (no step limit)", self.every_n_steps)
            return
        steps = list(range((start // self.every_n_steps + 1) * self.every_n_steps, end + 1, self.every_n_steps))
        if not steps:
            log.warning("drift: callbacks.drift.every_n_steps=%d > the %d optimizer steps left (trainer.max_steps=%d): "
                        "the drift evaluation never runs in this run", self.every_n_steps, end - start, end)
        else:
            shown = ", ".join(map(str, steps[:5])) + (", ..." if len(steps) > 5 else "")
            log.info("drift: %d prompts x %d latent frames at optimizer steps %s (%d evaluations)", len(self.prompts),
                     self.num_frames, shown, len(steps))

    def _load(self, device: torch.device) -> None:
        if self._measures is None:
            self._measures, self._unavailable = load_measures(self.weights_dir, self.measure_names, device)

    # -- the hook -------------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step // self.every_n_steps == self._last_step // self.every_n_steps:
            return
        self._last_step = step
        if trainer.is_global_zero:
            self.evaluate(trainer, pl_module, step)
        trainer.strategy.barrier("drift_callback")

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> dict[str, float]:
        """Sample, measure and log; returns the logged scalars."""
        device = torch.device(self.device) if self.device else pl_module.device
        start = time.perf_counter()
        log.info("drift @ step %d: sampling %d prompts x %d latent frames", step, len(self.prompts), self.num_frames)
        self._load(device)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with rng_fence(self.seed), torch.no_grad():
                videos = pl_module.sample_videos(self.prompts, self.num_frames, self.seed).clamp(-1, 1)  # as a file
        finally:
            pl_module.train(was_training)
        if videos.ndim != 5 or videos.shape[0] != len(self.prompts) or videos.shape[2] != 3:
            raise ValueError(
                f"sample_videos must return pixels [B={len(self.prompts)}, T, 3, H, W], got {tuple(videos.shape)}"
            )
        videos = videos.detach().float().cpu()

        results = []
        for prompt, frames in zip(self.prompts, videos):
            r = video_drift(frames, self._measures, self.fps, self.segments, self.drift_weights, self._unavailable)
            r["prompt"] = prompt
            results.append(r)
        oracle_summary = None
        if self.oracle:
            from src.worlds.toy.oracle import score_videos

            oracle_summary = jsonable(score_videos(list(videos), self.prompts, segments=self.segments))
        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / "drift" / f"step_{step:07d}"
        vbench = None
        if self.vbench:
            for i, (prompt, frames) in enumerate(zip(self.prompts, videos)):
                write_video(out_dir / "videos" / f"{prompt}-{i}.mp4", frames, self.fps)
            vbench = run_vbench(
                out_dir / "videos", out_dir / "vbench", self.vbench_dimensions, name=f"step_{step}",
                python=self.vbench_python, cache_dir=self.vbench_cache_dir,
                long=videos.shape[1] / self.fps >= LONG_VIDEO_S,
            )
        summary = summarise_method(results, None, vbench)
        metrics = self._scalars(summary["summary"], oracle_summary)
        self._log(trainer, step, metrics, summary["segments"], videos, out_dir)
        log.info("drift @ step %d: score %s (%.1f s) -> %s", step, metrics.get("drift/score"),
                 time.perf_counter() - start, out_dir)
        return metrics

    @staticmethod
    def _scalars(summary: dict, oracle_summary: dict | None) -> dict[str, float]:
        metrics = {}
        if summary["drift"] is not None:
            metrics["drift/score"] = summary["drift"]
        metrics.update({f"drift/slope_{m}": v for m, v in summary["slopes"].items() if v is not None})
        if summary["delta_imaging_quality_pct"] is not None:
            metrics["drift/delta_imaging_quality_pct"] = summary["delta_imaging_quality_pct"]
        metrics[f"drift/{MOTION_PROXY_NAME}"] = summary[MOTION_PROXY_NAME]
        for dim, score in (summary.get("vbench") or {}).items():
            metrics[f"drift/vbench_{dim}"] = score
        for key, value in (oracle_summary or {}).items():
            if isinstance(value, (int, float)):
                metrics[f"drift/oracle_{key}"] = float(value)
            elif key == "drift" and isinstance(value, dict):  # {measure: {statistic: value}}
                for measure, stats in value.items():
                    for stat, v in (stats.items() if isinstance(stats, dict) else []):
                        if isinstance(v, (int, float)):
                            metrics[f"drift/oracle_drift_{measure}_{stat}"] = float(v)
        return {k: float(v) for k, v in metrics.items()}

    def _history_figure(self):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for key in ("drift/score", "drift/oracle_fidelity"):
            points = [(h["step"], h[key]) for h in self.history if key in h]
            if points:
                ax.plot(*zip(*points), marker="o", label=key)
        ax.set_xlabel("training step")
        ax.set_title("drift over training")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        return fig

    def _log(self, trainer: L.Trainer, step: int, metrics: dict[str, float], segments: dict[str, list[float]],
             videos: torch.Tensor, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps({"step": step, **metrics, "segments": segments}, indent=2))
        fig = segment_figure({"samples": segments}, title=f"drift, step {step}", duration_s=videos.shape[1] / self.fps)
        fig.savefig(out_dir / "segments.png", dpi=100)
        sheet = grid(videos)  # every prompt in one video
        video_path = write_video(out_dir / "samples.mp4", sheet, self.fps)
        self.history.append({"step": step, **metrics})
        (out_dir.parent / "history.json").write_text(json.dumps(self.history, indent=2))
        history = self._history_figure()
        history.savefig(out_dir.parent / "history.png", dpi=100)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                # one row, at the optimizer step: media logged alone sit at wandb's own step (its count of log calls)
                logger.experiment.define_metric("drift/*", step_metric="trainer/global_step")
                logger.experiment.log({
                    **metrics, "trainer/global_step": step,
                    "drift/segments": wandb.Image(str(out_dir / "segments.png")),
                    "drift/history": wandb.Image(str(out_dir.parent / "history.png")),
                    # a file keeps its own frame rate: wandb warns when fps is passed with a path
                    "drift/samples": wandb.Video(str(video_path)),
                })
                continue
            logger.log_metrics(metrics, step=step)
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("drift/segments", fig, global_step=step, close=False)
                logger.experiment.add_figure("drift/history", history, global_step=step, close=False)
                factor = upscale_factor("auto", *sheet.shape[-2:])
                clip = torch.from_numpy(view_frames(sheet, factor)).permute(0, 3, 1, 2)[None]  # [1, T, 3, H, W]
                logger.experiment.add_video("drift/samples", clip, global_step=step, fps=int(round(self.fps)))
        plt.close(fig)
        plt.close(history)
