"""Videos on disk: mp4 <-> [T, 3, H, W] tensors in [-1, 1] (one writer for every video the project makes), and the
layout of an evaluation folder.

Folder layout (`videos_dir`): one subfolder per method holding `.mp4` files, or `.mp4` files directly (one method,
named after the folder). A video's prompt comes from, in order: an optional prompts JSON ({"method/file.mp4" or
"file.mp4": prompt}); the `settings.json` that `python -m src.generate` writes beside its videos ({"videos": [{"file",
"prompt"}, ...]}); its file name, VBench style: `<prompt>-<index>.mp4` -> `<prompt>`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import imageio.v2 as imageio
import imageio.v3 as iio
import numpy as np
import torch

_INDEX_SUFFIX = re.compile(r"-\d+$")


@dataclass(frozen=True)
class VideoEntry:
    method: str
    path: Path
    prompt: str

    @property
    def key(self) -> str:
        return f"{self.method}/{self.path.name}"


def read_video(path: str | Path) -> tuple[torch.Tensor, float]:
    """mp4 -> (frames [T, 3, H, W] float in [-1, 1], fps)."""
    path = Path(path)
    frames = iio.imread(path, plugin="FFMPEG")
    fps = float(iio.immeta(path, plugin="FFMPEG")["fps"])
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0, fps


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[T, 3, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    x = ((frames.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def upscale_factor(spec: int | str, height: int, width: int) -> int:
    """'auto': the smallest integer factor that makes the short side >= 256 px; else the given integer >= 1."""
    if spec == "auto":
        return max(1, math.ceil(256 / min(height, width)))
    if int(spec) < 1:
        raise ValueError(f"upscale must be 'auto' or an integer >= 1, got {spec}")
    return int(spec)


def view_frames(frames: torch.Tensor, factor: int) -> np.ndarray:
    """[T, 3, H, W] in [-1, 1] -> uint8 [T, H*factor, W*factor, 3] (nearest neighbour)."""
    x = to_uint8(frames)
    return x.repeat(factor, axis=1).repeat(factor, axis=2) if factor > 1 else x


def grid(videos: torch.Tensor, columns: int | None = None, gap: int = 1) -> torch.Tensor:
    """[B, T, 3, H, W] -> one video [T, 3, rows*(H+gap)-gap, columns*(W+gap)-gap], black between tiles."""
    b, t, c, h, w = videos.shape
    columns = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / columns)
    out = torch.full((t, c, rows * (h + gap) - gap, columns * (w + gap) - gap), -1.0, dtype=videos.dtype)
    for i, video in enumerate(videos):
        r, k = divmod(i, columns)
        out[:, :, r * (h + gap) : r * (h + gap) + h, k * (w + gap) : k * (w + gap) + w] = video
    return out


class VideoWriter:
    """The one mp4 writer: H.264 in yuv420p (the chroma layout every browser plays), frames nearest-upscaled by
    `upscale` ('auto': to >= 256 px, which also keeps 4:2:0 chroma from smearing tiny frames), appended as they come
    (a streamed video is written block by block). Use as a context manager."""

    def __init__(self, path: str | Path, fps: float, upscale: int | str = "auto", crf: int = 10):
        self.path, self.fps, self.upscale, self.crf = Path(path), float(fps), upscale, crf
        self._writer = None
        self.factor: int | None = None

    def append(self, frames: torch.Tensor) -> None:
        """frames [T, 3, H, W] in [-1, 1]."""
        if self._writer is None:
            self.factor = upscale_factor(self.upscale, *frames.shape[-2:])
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = imageio.get_writer(
                str(self.path), fps=self.fps, codec="libx264", pixelformat="yuv420p", macro_block_size=2,
                quality=None, ffmpeg_log_level="error", output_params=["-crf", str(self.crf)])
        for frame in view_frames(frames, self.factor):
            self._writer.append_data(frame)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_video(path: str | Path, frames: torch.Tensor, fps: float, upscale: int | str = "auto") -> Path:
    """[T, 3, H, W] in [-1, 1] -> mp4 through VideoWriter."""
    with VideoWriter(path, fps, upscale) as writer:
        writer.append(frames)
    return Path(path)


def pixel_format(path: str | Path) -> str:
    """The pixel format of the file's video stream as ffmpeg reports it (e.g. yuv420p)."""
    import subprocess

    import imageio_ffmpeg

    info = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True,
                          text=True).stderr
    stream = next((line for line in info.splitlines() if "Video:" in line), None)
    if stream is None:
        raise ValueError(f"{path}: no video stream")
    return stream.split("Video:")[1].split(",")[1].split("(")[0].strip()


def prompt_from_filename(path: str | Path) -> str:
    """VBench's convention: `a red circle moving left-0.mp4` -> `a red circle moving left`."""
    return _INDEX_SUFFIX.sub("", Path(path).stem)


def _generated_prompts(folder: Path) -> dict[str, str]:
    """{file name: prompt} from src.generate's settings.json in `folder` (empty when there is none)."""
    settings = folder / "settings.json"
    if not settings.is_file():
        return {}
    videos = json.loads(settings.read_text()).get("videos", [])
    return {v["file"]: v["prompt"] for v in videos if "file" in v and "prompt" in v}


def list_videos(videos_dir: str | Path, prompts_file: str | Path | None = None) -> list[VideoEntry]:
    """Every mp4 of the folder as (method, path, prompt), sorted by method then file name."""
    root = Path(videos_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"videos_dir {root} is not a folder")
    prompts: dict[str, str] = {}
    if prompts_file is not None:
        prompts = json.loads(Path(prompts_file).read_text())
        if not isinstance(prompts, dict):
            raise ValueError(f"{prompts_file} must hold a JSON object {{video path: prompt}}")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and any(p.glob("*.mp4")))
    groups = [(d.name, sorted(d.glob("*.mp4"))) for d in subdirs]
    top = sorted(root.glob("*.mp4"))
    if top:
        groups.insert(0, (root.name, top))
    entries = []
    for method, files in groups:
        generated = _generated_prompts(files[0].parent)
        for f in files:
            prompt = prompts.get(f"{method}/{f.name}", prompts.get(f.name, generated.get(f.name)))
            entries.append(VideoEntry(method, f, prompt if prompt is not None else prompt_from_filename(f)))
    if not entries:
        raise FileNotFoundError(f"no .mp4 files in {root} or its method subfolders")
    return entries
