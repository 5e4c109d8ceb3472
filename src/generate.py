"""`python -m src.generate`: prompts -> one mp4 per prompt (and settings.json) with any sampler order.

    python -m src.generate checkpoint=logs/.../student.safetensors prompts="a red square moves left"
    python -m src.generate checkpoint=hiar.pt prompts=prompts.txt sampler=block_first num_frames=81 seed=3
    python -m src.generate checkpoint=... prompts="a red circle moving left | a red circle moving up" switch_every=9
    python -m src.generate checkpoint=... prompts="a red circle moving up" context=first.png          # image-to-video
    python -m src.generate checkpoint=... prompts="..." context=a.mp4 context_frames=6 num_frames=81  # extend a.mp4

The pipeline is src.api.HiAR (the Python API): one code path. A prompt may be a schedule, prompts separated by " | ",
switching every `switch_every` latent frames (the stream re-caches the context under the new prompt).
With a context (an image or a video file; src/continuation.py) every video starts with it and continues it.
Videos stream to disk block by block as the sampler finalises them. Video i uses NoiseBank(seed + i); the settings
(sampler, timesteps, checkpoint, model config, seeds, files) are written to settings.json in the output folder.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict
from pathlib import Path

import hydra
from omegaconf import DictConfig
from tqdm import tqdm

from src.api import HiAR, parse_schedule
from src.io import atomic_write_text, load_prompts
from src.schema import check_generate, refusals
from src.video_io import upscale_factor

log = logging.getLogger(__name__)


def slug(prompt: str, length: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:length] or "video"


def generate(cfg: DictConfig) -> list[Path]:
    """Check every input, load the pipeline (src.api.HiAR), write one mp4 per prompt and settings.json; return the
    mp4s."""
    if not Path(str(cfg.checkpoint)).exists():
        raise FileNotFoundError(f"checkpoint not found: {cfg.checkpoint}")
    fpb = int(cfg.sampler.frames_per_block)
    if cfg.num_frames <= 0 or cfg.num_frames % fpb:
        raise ValueError(f"num_frames={cfg.num_frames} is not a positive multiple of the block size {fpb}")
    prompts = load_prompts(cfg.prompts, cfg.max_prompts)
    switch_every = cfg.get("switch_every")
    context = cfg.get("context")
    if context is not None and not Path(str(context)).is_file():
        raise FileNotFoundError(f"context file not found: {context}")
    for prompt in prompts:  # every schedule is checked before any model is loaded
        parse_schedule(prompt, switch_every, cfg.num_frames, fpb)
    pipe = HiAR.from_config(cfg)
    sampler = pipe.sampler

    out_dir = Path(str(cfg.output_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    num_blocks = cfg.num_frames // fpb
    names = [f"{i:04d}_{slug(prompt)}.mp4" for i, prompt in enumerate(prompts)]
    bars: dict[int, tqdm] = {}
    videos: list[dict] = []

    def progress_for(i):
        bars[i] = tqdm(total=num_blocks * sampler.num_steps, desc=f"video {i + 1}/{len(prompts)}", unit="cell")

        def progress(step, block, bar=bars[i]):
            bar.set_postfix_str(f"step {step + 1}/{sampler.num_steps} block {block + 1}/{num_blocks}", refresh=False)
            bar.update(1)

        return progress

    def on_video(i, record):
        bars.pop(i).close()
        log.info("%s (%.1f s)", out_dir / names[i], record["seconds"])
        videos.append({"prompt": prompts[i], "file": names[i], **record})

    files = pipe.generate(prompts, cfg.num_frames, seed=int(cfg.seed), switch_every=switch_every, out=out_dir,
                          names=names, on_video=on_video, progress_for=progress_for,
                          context=str(context) if context is not None else None,
                          context_frames=cfg.get("context_frames"))
    settings = {
        "checkpoint": str(cfg.checkpoint),
        "which": cfg.which,
        "model_config": pipe.model.cfg.to_dict(),
        "world": cfg.world.name,
        "sampler": {**asdict(sampler), "timesteps": sampler.timesteps},
        "num_frames": cfg.num_frames,
        "switch_every": switch_every,
        "context": str(context) if context is not None else None,
        "context_frames": cfg.get("context_frames"),
        "pixel_frames": pipe.codec.num_pixel_frames(cfg.num_frames),
        "fps": pipe.fps,
        "upscale": upscale_factor(cfg.upscale, cfg.world.video.height, cfg.world.video.width),
        "device": str(pipe.device),
        "dtype": cfg.dtype,
        "noise": "video i uses NoiseBank(seed + i); see src/sampling/noise.py for the address order",
        "videos": videos,
    }
    atomic_write_text(out_dir / "settings.json", json.dumps(settings, indent=2))
    return files


@hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parents[1] / "conf"),
            config_name="generate")
def main(cfg: DictConfig) -> None:
    with refusals(cfg):  # a refused command prints one line and leaves no run folder
        check_generate(cfg)
    generate(cfg)


if __name__ == "__main__":
    main()
