"""`python -m src.generate`: prompts -> one mp4 per prompt (and settings.json) with any sampler order.

    python -m src.generate checkpoint=logs/.../student.safetensors prompts="a red square moves left"
    python -m src.generate checkpoint=hiar.pt prompts=prompts.txt sampler=block_first num_frames=81 seed=3

Videos stream to disk block by block as the sampler finalises them. Video i uses NoiseBank(seed + i); the settings
(sampler, timesteps, checkpoint, model config, seeds, files) are written to settings.json in the output folder.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import asdict
from pathlib import Path

import hydra
import imageio.v2 as imageio
import numpy as np
import torch
import webdataset as wds
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from src.checkpoints import load_dit
from src.sampling.noise import NoiseBank
from src.sampling.schedules import SamplerConfig, hybrid_steps_of
from src.sampling.stream import stream

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _shard_urls(spec: str) -> str | list[str] | None:
    """Webdataset shards named by a folder of .tar files, a .tar file or a brace pattern; None if spec is none."""
    path = Path(spec)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"prompt folder {spec} holds no .tar shards")
        return shards
    if spec.endswith(".tar") and "{" not in spec:
        if not path.is_file():
            raise FileNotFoundError(f"prompt shard not found: {spec}")
        return [spec]
    if ".tar" in spec and "{" in spec:
        return spec
    return None


def _shard_prompt(sample: dict) -> str:
    if "json" in sample:
        meta = json.loads(sample["json"])
        if isinstance(meta, dict) and "prompt" in meta:
            return str(meta["prompt"])
    if "txt" in sample:
        return sample["txt"].decode("utf-8")
    raise ValueError(f"shard sample {sample.get('__key__')!r} has no prompt (a json 'prompt' field or a .txt entry)")


def load_prompts(spec: str, limit: int | None = None) -> list[str]:
    """A prompt, a text file (one prompt per non-empty line) or webdataset shards of the toy world."""
    spec = str(spec)
    urls = _shard_urls(spec)
    if urls is not None:
        prompts = []
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            if limit is not None and len(prompts) >= limit:
                break
            prompts.append(_shard_prompt(sample))
        source = f"shards {spec}"
    elif Path(spec).is_file():
        prompts = [line.strip() for line in Path(spec).read_text().splitlines() if line.strip()]
        source = f"prompt file {spec}"
    elif spec.endswith((".txt", ".tar")):
        raise FileNotFoundError(f"prompt file not found: {spec}")
    else:
        prompts = [spec.strip()] if spec.strip() else []
        source = "the prompts argument"
    prompts = prompts[:limit] if limit is not None else prompts
    if not prompts:
        raise ValueError(f"no prompts in {source}")
    return prompts


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def upscale_factor(spec, height: int, width: int) -> int:
    """'auto': the smallest integer factor that makes the short side >= 256 px; else the given integer."""
    if spec == "auto":
        return max(1, math.ceil(256 / min(height, width)))
    if int(spec) < 1:
        raise ValueError(f"upscale must be 'auto' or an integer >= 1, got {spec}")
    return int(spec)


def view_frames(pixels: torch.Tensor, factor: int) -> np.ndarray:
    """[T, 3, H, W] in [-1, 1] -> uint8 [T, H*factor, W*factor, 3] (nearest neighbour)."""
    frames = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    frames = frames.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
    return frames.permute(0, 2, 3, 1).cpu().numpy()


def slug(prompt: str, length: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:length] or "video"


def generate(cfg: DictConfig) -> list[Path]:
    """Check every input, load the model and world, write one mp4 per prompt and settings.json; return the mp4s."""
    checkpoint = Path(str(cfg.checkpoint))
    if not checkpoint.exists():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    sampler_options = OmegaConf.to_container(cfg.sampler, resolve=True)
    order = sampler_options.pop("order")
    sampler = SamplerConfig(**sampler_options)
    hybrid_steps_of(order, sampler)  # validates the order
    fpb = sampler.frames_per_block
    if cfg.num_frames <= 0 or cfg.num_frames % fpb:
        raise ValueError(f"num_frames={cfg.num_frames} is not a positive multiple of the block size {fpb}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    prompts = load_prompts(cfg.prompts, cfg.max_prompts)
    device = resolve_device(cfg.device)

    config = hydra.utils.instantiate(cfg.model_config) if cfg.model_config is not None else None
    model = load_dit(checkpoint, which=cfg.which, config=config, device=device, dtype=DTYPES[cfg.dtype]).eval()
    if cfg.get("compile", False):  # compile each transformer block (src.models.compile); CLI: compile=true
        from src.models.compile import compile_blocks

        compile_blocks(model)
    text_encoder = hydra.utils.instantiate(cfg.world.text_encoder).to(device).eval()
    codec = hydra.utils.instantiate(cfg.world.codec).to(device).eval()
    latent = cfg.world.latent
    latent_shape = (latent.channels, latent.height, latent.width)
    factor = upscale_factor(cfg.upscale, cfg.world.video.height, cfg.world.video.width)
    fps = cfg.world.fps

    out_dir = Path(str(cfg.output_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    num_blocks = cfg.num_frames // fpb
    videos, files = [], []
    for i, prompt in enumerate(prompts):
        seed = int(cfg.seed) + i
        path = out_dir / f"{i:04d}_{slug(prompt)}.mp4"
        with torch.no_grad():
            context = text_encoder.encode([prompt])[0].to(device)
        bar = tqdm(total=num_blocks * sampler.num_steps, desc=f"video {i + 1}/{len(prompts)}", unit="cell")

        def progress(step, block, bar=bar):
            bar.set_postfix_str(f"step {step + 1}/{sampler.num_steps} block {block + 1}/{num_blocks}", refresh=False)
            bar.update(1)

        start = time.perf_counter()
        first_block_s = None
        writer = imageio.get_writer(str(path), fps=fps, codec="libx264", macro_block_size=2, ffmpeg_log_level="error")
        try:
            for block in stream(model, context, cfg.num_frames, latent_shape, sampler, NoiseBank(seed), order=order,
                                codec=codec, progress=progress):
                first_block_s = first_block_s if first_block_s is not None else time.perf_counter() - start
                for frame in view_frames(block.pixels[0], factor):
                    writer.append_data(frame)
        finally:
            writer.close()
            bar.close()
        seconds = time.perf_counter() - start
        log.info("%s (%.1f s)", path, seconds)
        files.append(path)
        videos.append({"prompt": prompt, "file": path.name, "seed": seed, "seconds": seconds,
                       "first_block_seconds": first_block_s})

    settings = {
        "checkpoint": str(checkpoint),
        "which": cfg.which,
        "model_config": model.cfg.to_dict(),
        "world": cfg.world.name,
        "sampler": {"order": order, **asdict(sampler), "timesteps": sampler.timesteps},
        "num_frames": cfg.num_frames,
        "pixel_frames": codec.num_pixel_frames(cfg.num_frames),
        "fps": fps,
        "upscale": factor,
        "device": str(device),
        "dtype": cfg.dtype,
        "noise": "video i uses NoiseBank(seed + i); see src/sampling/noise.py for the address order",
        "videos": videos,
    }
    (out_dir / "settings.json").write_text(json.dumps(settings, indent=2))
    return files


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    generate(cfg)


if __name__ == "__main__":
    main()
