"""The Python API for a trained student (and the code path of `python -m src.generate`).

    from src.api import HiAR

    pipe = HiAR.from_checkpoint("artifacts/toy/hiar_fkl/student.safetensors", world="toy")
    video = pipe.generate(["a red circle moving left on a black background"], num_frames=21)  # [B, T, 3, H, W]
    files = pipe.generate(["a red circle moving left on a black background"], out="outputs/api")  # mp4 paths
    for block in pipe.stream("a red circle moving left on a black background | a red circle moving up on a black
                              background", num_frames=21, switch_every=9):
        block.pixels  # [1, t, 3, H, W] in [-1, 1], as soon as the sampler has finished the block

Continuation (image-to-video, video extension): ``context=`` an image (a PIL image, a tensor [3, H, W] or a .png path),
a video tensor [T, 3, H, W] in [-1, 1] or an mp4 path; ``context_frames=k`` uses its last k latent frames. The video
then starts with the context (as the codec reconstructs it) and continues it up to num_frames latent frames; the
rules for the codec's causal first frame and for whole blocks are in src/continuation.py.

    video = pipe.generate("a red circle moving left on a black background", num_frames=21, context="first.png")
    files = pipe.generate("a red circle moving up on a black background", num_frames=81, context="outputs/a.mp4",
                          context_frames=6, out="outputs/extended")  # extend a video from its last 6 latent frames

A prompt schedule is one string with prompts separated by " | " (the k-th starts at latent frame k * switch_every),
or a mapping {first latent frame: prompt}; frames must fall on block boundaries. Video i of a call uses
NoiseBank(seed + i), exactly as src.generate does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from src.checkpoints import load_dit
from src.continuation import Alignment, encode_context
from src.sampling.noise import NoiseBank
from src.sampling.orders import SamplerConfig
from src.sampling.streaming import StreamedBlock, stream
from src.video_io import VideoWriter, upscale_factor

CONF = Path(__file__).resolve().parents[1] / "conf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SEPARATOR = "|"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def parse_schedule(schedule: str | Mapping[int, str], switch_every: int | None, num_frames: int,
                   frames_per_block: int) -> dict[int, str]:
    """{first latent frame: prompt} from "a | b" (+ switch_every latent frames) or a mapping; checked."""
    if isinstance(schedule, str):
        prompts = [p.strip() for p in schedule.split(SEPARATOR)]
        if any(not p for p in prompts):
            raise ValueError(f"empty prompt in the schedule {schedule!r}")
        if len(prompts) > 1 and not switch_every:
            raise ValueError(f"the schedule {schedule!r} has {len(prompts)} prompts: set switch_every (latent frames)")
        starts = {k * int(switch_every or 0): p for k, p in enumerate(prompts)}
    else:
        starts = {int(k): str(v) for k, v in schedule.items()}
    if 0 not in starts:
        raise ValueError("the prompt schedule must start at frame 0")
    for frame in starts:
        if frame % frames_per_block or not 0 <= frame < num_frames:
            raise ValueError(f"prompt switch at latent frame {frame}: must be a multiple of the block size "
                             f"{frames_per_block} below num_frames={num_frames}")
    return dict(sorted(starts.items()))


class HiAR:
    """A causal student with its world's text encoder and codec and a sampler: prompts in, pixels out."""

    def __init__(self, model, text_encoder, codec, latent_shape: Sequence[int], fps: float, sampler: SamplerConfig,
                 upscale: int | str = "auto"):
        self.model, self.text_encoder, self.codec = model, text_encoder, codec
        self.latent_shape, self.fps, self.sampler = tuple(latent_shape), float(fps), sampler
        self.upscale = upscale
        self.device = next(model.parameters()).device

    # ------------------------------------------------------------------------------------------- construction

    @classmethod
    def from_config(cls, cfg: DictConfig) -> HiAR:
        """From a composed conf/generate.yaml (checkpoint, which, model_config, world, sampler, device, dtype)."""
        checkpoint = Path(str(cfg.checkpoint))
        if not checkpoint.exists():
            raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
        if cfg.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
        sampler = SamplerConfig(**OmegaConf.to_container(cfg.sampler, resolve=True))
        upscale_factor(cfg.upscale, cfg.world.video.height, cfg.world.video.width)  # validates before loading
        device = resolve_device(cfg.device)
        config = hydra.utils.instantiate(cfg.model_config) if cfg.model_config is not None else None
        model = load_dit(checkpoint, which=cfg.which, config=config, device=device, dtype=DTYPES[cfg.dtype]).eval()
        if cfg.get("compile", False):  # compile each transformer block (src.distributed.parallelize); CLI: compile=true
            from src.distributed.parallelize import compile_blocks

            compile_blocks(model)
        text_encoder = hydra.utils.instantiate(cfg.world.text_encoder).to(device).eval()
        codec = hydra.utils.instantiate(cfg.world.codec).to(device).eval()
        latent = cfg.world.latent
        return cls(model, text_encoder, codec, (latent.channels, latent.height, latent.width), cfg.world.fps, sampler,
                   cfg.upscale)

    @classmethod
    def from_checkpoint(cls, path: str | Path, world: str = "toy", sampler: str = "step_first", which: str = "auto",
                        device: str = "auto", dtype: str = "float32", overrides: Sequence[str] = ()) -> HiAR:
        """Composes conf/generate.yaml for `world` and `sampler` (plus Hydra `overrides`, e.g. "sampler.window=9")."""
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("generate", overrides=[f"world={world}", f"sampler={sampler}", f"checkpoint={path}",
                                                 f"which={which}", f"device={device}", f"dtype={dtype}", "prompts=",
                                                 "output_dir=", *overrides])
        return cls.from_config(cfg)

    @property
    def order(self) -> str:
        return self.sampler.order

    # ------------------------------------------------------------------------------------------- sampling

    def check_frames(self, num_frames: int) -> None:
        fpb = self.sampler.frames_per_block
        if num_frames <= 0 or num_frames % fpb:
            raise ValueError(f"num_frames={num_frames} is not a positive multiple of the block size {fpb}")

    def encode(self, schedule: Mapping[int, str]) -> torch.Tensor | dict[int, torch.Tensor]:
        """Text embeddings: one tensor for a single prompt, else {start block: embeddings}."""
        fpb = self.sampler.frames_per_block
        with torch.no_grad():
            embedded = {frame // fpb: self.text_encoder.encode([p])[0].to(self.device) for frame, p in schedule.items()}
        return embedded[0] if len(embedded) == 1 else embedded

    def encode_context(self, context, context_frames: int | None = None) -> tuple[torch.Tensor, Alignment]:
        """An image, a video tensor or a file -> (clean latents [1, k, C, h, w], its Alignment); src/continuation.py."""
        _, h, w = self.latent_shape
        s = self.codec.spatial_compression
        return encode_context(self.codec, context, frames_per_block=self.sampler.frames_per_block, height=h * s,
                              width=w * s, context_frames=context_frames, device=self.device)

    def stream(self, prompt_schedule: str | Mapping[int, str], num_frames: int = 81, seed: int = 0,
               switch_every: int | None = None, order: str | None = None,
               progress: Callable[[int, int], None] | None = None, context=None,
               context_frames: int | None = None) -> Iterator[StreamedBlock]:
        """Decoded blocks of one video as soon as each is final (block.pixels [1, t, 3, H, W] in [-1, 1]); with a
        ``context``, its blocks come first (block.given) and the sampler continues after them."""
        prefix = self.encode_context(context, context_frames)[0] if context is not None else None
        yield from self._stream(prompt_schedule, num_frames, seed, switch_every, order, progress, prefix)

    def check_schedule(self, prompt_schedule, switch_every: int | None, num_frames: int,
                       given: int = 0) -> dict[int, str]:
        """The parsed schedule, checked against num_frames and the ``given`` latent frames of a context."""
        self.check_frames(num_frames)
        schedule = parse_schedule(prompt_schedule, switch_every, num_frames, self.sampler.frames_per_block)
        if given >= num_frames:
            raise ValueError(f"the context has {given} latent frames: num_frames={num_frames} leaves nothing to "
                             f"generate (set a larger num_frames, or fewer context_frames)")
        inside = [frame for frame in schedule if 0 < frame < given]
        if inside:
            raise ValueError(f"prompt switch at latent frame {inside[0]} falls inside the {given} context frames")
        return schedule

    def _stream(self, prompt_schedule, num_frames, seed, switch_every, order, progress,
                prefix: torch.Tensor | None) -> Iterator[StreamedBlock]:
        given = 0 if prefix is None else prefix.shape[1]
        schedule = self.check_schedule(prompt_schedule, switch_every, num_frames, given)
        for block in stream(self.model, self.encode(schedule), num_frames, self.latent_shape, self.sampler,
                            NoiseBank(seed), order=order, codec=self.codec, progress=progress, prefix=prefix):
            # a decoder overshoots [-1, 1] (a distilled student more than its ODE init): clamp as a video file would,
            # so that the tensors equal what src.generate writes and every evaluation scores
            yield replace(block, pixels=block.pixels.clamp(-1, 1)) if block.pixels is not None else block

    def generate(self, prompts: str | Sequence[str | Mapping[int, str]], num_frames: int = 81, order: str | None = None,
                 seed: int = 0, switch_every: int | None = None, out: str | Path | None = None,
                 names: Sequence[str] | None = None, on_video=None, progress_for=None, context=None,
                 context_frames: int | None = None) -> torch.Tensor | list[Path]:
        """Video i from NoiseBank(seed + i). Without `out`: pixels [B, T, 3, H, W] in [-1, 1]. With `out`: one mp4 per
        prompt there (names[i] or <i>.mp4), streamed to disk block by block; returns the paths.
        context: one context for every video, or a list with one per prompt (see `stream`); each is encoded once,
        before any video is sampled.
        on_video(i, record) receives {"seed", "seconds", "first_block_seconds"} (plus "context": the Alignment's
        fields) per video; progress_for(i) may return a progress(step, block) callable for video i."""
        prompts = [prompts] if isinstance(prompts, str | Mapping) else list(prompts)
        self.check_frames(num_frames)
        contexts = list(context) if isinstance(context, list | tuple) else [context] * len(prompts)
        if len(contexts) != len(prompts):
            raise ValueError(f"{len(contexts)} contexts for {len(prompts)} prompts: give one, or one per prompt")
        encoded = {}
        for c in contexts:
            if c is not None and id(c) not in encoded:
                encoded[id(c)] = self.encode_context(c, context_frames)
        for prompt, c in zip(prompts, contexts):  # every check before the first video
            self.check_schedule(prompt, switch_every, num_frames, encoded[id(c)][0].shape[1] if c is not None else 0)
        videos, files = [], []
        for i, prompt in enumerate(prompts):
            start, first_block = time.perf_counter(), None
            path = Path(out) / (names[i] if names else f"{i:04d}.mp4") if out is not None else None
            writer = VideoWriter(path, self.fps, self.upscale) if path is not None else None
            blocks = []
            try:
                prefix, alignment = encoded.get(id(contexts[i]), (None, None))
                for block in self._stream(prompt, num_frames, seed + i, switch_every, order,
                                          progress_for(i) if progress_for else None, prefix):
                    if first_block is None and not block.given:
                        first_block = time.perf_counter() - start
                    if writer is not None:
                        writer.append(block.pixels[0])
                    else:
                        blocks.append(block.pixels[0].cpu())
            finally:
                if writer is not None:
                    writer.close()
            if on_video is not None:
                record = {"seed": seed + i, "seconds": time.perf_counter() - start, "first_block_seconds": first_block}
                on_video(i, record if alignment is None else {**record, "context": alignment.to_dict()})
            if writer is not None:
                files.append(path)
            else:
                videos.append(torch.cat(blocks))
        return files if out is not None else torch.stack(videos)
