"""Continuation: the frames a video continues from (an image, a video tensor, an mp4) as clean latents of whole blocks.

The world's codec encodes them; the sampler writes them into its KV cache with its own clean-context write and
continues from the next block, under every order (src/sampling/orders.py, "Given frames"). Rules, in this order:

1. **Reading.** An image (a PNG/JPEG path, a PIL image, a tensor [3, H, W]) is a video of one frame; a video is a
   tensor [T, 3, H, W] (or [B, T, 3, H, W]) in [-1, 1] or a video file (.mp4). Frames larger than the world's by one
   integer factor on both sides (src.generate upscales its mp4s for viewing, nearest-neighbour) are area-averaged
   back down; any other size is an error.
2. **The causal first frame.** The codec maps 1 + T*j pixel frames to 1 + j latent frames (Wan VAE: T = 4, the first
   frame is encoded alone; toy codec: T = 1). Of P pixel frames the last 1 + T*((P-1) // T) are kept: the oldest
   (P-1) % T are dropped, so that the first kept frame is a causal first frame and the context starts as every
   training clip starts. An image is one latent frame.
3. **Whole blocks.** The sampler works in blocks of f latent frames. With ``context_frames`` = k (a positive multiple
   of f, at most the L latent frames the video holds) the context is its last k latent frames; by default it is its
   latest whole blocks, k = f * (L // f): the oldest L % f latent frames are trimmed, so the seam -- the newest frame,
   the one the continuation must match -- is always a real frame. A context shorter than one block (L < f: an image,
   a clip of fewer than 1 + T(f-1) frames) is padded to one block at the front by repeating its first pixel frame:
   an image becomes a still block whose every frame is the image. The pixel frames encoded are the last 1 + T(k-1).
4. **Placement.** The context becomes latent frames 0 .. k-1 of the output (RoPE positions from 0, wherever it sat in
   its source video; the DiT's positions are relative, except that frame 0 is the causal first frame) and the
   continuation frames k .. num_frames-1. Outputs start with the context, decoded from its latents.

Rolling window and sinks: the given frames are cached exactly like frames the sampler made: with a ``window`` of W
latent frames, block n sees the W - f frames before it, so a context longer than that is still written block by
block (each block's keys see the blocks before it) and its oldest frames are evicted as the continuation advances;
``sink`` frames are the first frames of the context, never evicted. A prompt switch at the seam re-caches the whole
context under the new prompt (src/sampling/streaming.py), which equals writing it under the new prompt from the start.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif")
RANGE_TOLERANCE = 1e-3  # float rounding around [-1, 1]


@dataclass(frozen=True)
class Alignment:
    """How a context was fitted to the codec and the blocks (pixel frames counted along the source's time axis)."""

    source_frames: int  # pixel frames given
    dropped: int  # oldest pixel frames left out (causal first frame, whole blocks, context_frames)
    padded: int  # pixel frames repeated at the front (a context shorter than one block)
    latent_frames: int  # latent frames of the context: k, a multiple of the block size

    def to_dict(self) -> dict:
        return asdict(self)


def _image_to_tensor(array: np.ndarray, name: str) -> torch.Tensor:
    """uint8 [H, W] / [H, W, 3|4] -> [1, 1, 3, H, W] in [-1, 1]."""
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise ValueError(f"{name}: expected an 8-bit RGB(A) or grey image, got {array.dtype} {array.shape}")
    x = torch.from_numpy(np.array(array[..., :3])).permute(2, 0, 1).float() / 127.5 - 1.0
    return x[None, None]


def load_frames(source) -> torch.Tensor:
    """An image or a video (module docstring, rule 1) -> pixels [B, T, 3, H, W] in [-1, 1]."""
    from PIL import Image

    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"context file not found: {path}")
        if path.suffix.lower() in VIDEO_SUFFIXES:
            from src.video_io import read_video

            return read_video(path)[0][None]
        import imageio.v3 as iio

        return _image_to_tensor(iio.imread(path), str(path))
    if isinstance(source, Image.Image):
        return _image_to_tensor(np.asarray(source.convert("RGB")), "PIL image")
    if not isinstance(source, torch.Tensor):
        raise TypeError(f"context must be an image, a video tensor or a file path, got {type(source).__name__}")
    x = source.detach().float().cpu()
    x = {3: x[None, None], 4: x[None], 5: x}.get(x.dim())
    if x is None or x.shape[2] != 3:
        raise ValueError(f"a context tensor must be [3, H, W], [T, 3, H, W] or [B, T, 3, H, W], got "
                         f"{tuple(source.shape)}")
    if x.numel() and (x.min() < -1 - RANGE_TOLERANCE or x.max() > 1 + RANGE_TOLERANCE):
        raise ValueError(f"context pixels must lie in [-1, 1], got [{x.min():.3g}, {x.max():.3g}]")
    return x


def fit_size(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, T, 3, H', W'] -> [B, T, 3, height, width]: as is, or area-averaged by one integer factor (rule 1)."""
    h, w = frames.shape[-2:]
    if (h, w) == (height, width):
        return frames
    factor = h // height
    if factor < 1 or h != factor * height or w != factor * width:
        raise ValueError(f"context frames are {h}x{w}; the world's videos are {height}x{width} (or an integer "
                         f"multiple of it, as src.generate writes them)")
    b, t = frames.shape[:2]
    return F.avg_pool2d(frames.flatten(0, 1), factor).view(b, t, 3, height, width)


def align(frames: torch.Tensor, temporal_compression: int, frames_per_block: int,
          context_frames: int | None = None) -> tuple[torch.Tensor, Alignment]:
    """Pixels [B, P, 3, H, W] -> the pixels to encode [B, 1 + T(k-1), 3, H, W] and how (rules 2 and 3)."""
    tc, f = temporal_compression, frames_per_block
    p = frames.shape[1]
    if p < 1:
        raise ValueError("the context has no frames")
    available = 1 + (p - 1) // tc  # latent frames after dropping (p - 1) % tc oldest pixel frames
    if context_frames is not None:
        k = int(context_frames)
        if k <= 0 or k % f:
            raise ValueError(f"context_frames={k} must be a positive multiple of the block size {f}")
        if k > available:
            raise ValueError(f"context_frames={k} but the context holds only {available} latent frames "
                             f"({p} pixel frames)")
    else:
        k = f * max(1, available // f)
    keep = 1 + tc * (k - 1)  # pixel frames that encode to k latent frames
    padded = max(0, keep - p)
    if padded:
        frames = torch.cat([frames[:, :1].expand(-1, padded, -1, -1, -1), frames], 1)
    frames = frames[:, frames.shape[1] - keep:]
    return frames, Alignment(source_frames=p, dropped=max(0, p - keep), padded=padded, latent_frames=k)


def encode_context(codec, source, *, frames_per_block: int, height: int, width: int,
                   context_frames: int | None = None,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, Alignment]:
    """Any context (rule 1) -> (clean latents [B, k, C, h, w] of whole blocks for the sampler's ``prefix``, how it was
    aligned). Every check runs before the codec does."""
    frames = fit_size(load_frames(source), height, width)
    frames, alignment = align(frames, codec.temporal_compression, frames_per_block, context_frames)
    with torch.no_grad():
        latents = codec.encode(frames.to(device=device))
    if latents.shape[1] != alignment.latent_frames:
        raise RuntimeError(f"the codec made {latents.shape[1]} latent frames of {frames.shape[1]} pixel frames, "
                           f"expected {alignment.latent_frames}")
    return latents.float(), alignment
