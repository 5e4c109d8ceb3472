"""Videos on disk: mp4 <-> [T, 3, H, W] tensors in [-1, 1], and the layout of an evaluation folder.

Folder layout (`videos_dir`): one subfolder per method holding `.mp4` files, or `.mp4` files directly (one method,
named after the folder). A video's prompt comes from, in order: an optional prompts JSON ({"method/file.mp4" or
"file.mp4": prompt}); the `settings.json` that `python -m src.generate` writes beside its videos ({"videos": [{"file",
"prompt"}, ...]}); its file name, VBench style: `<prompt>-<index>.mp4` -> `<prompt>`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

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


def write_video(path: str | Path, frames: torch.Tensor, fps: float) -> Path:
    """[T, 3, H, W] in [-1, 1] -> H.264 mp4 (4:4:4 chroma, near-lossless: tiny toy frames keep their colours)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(
        path, to_uint8(frames), fps=fps, plugin="FFMPEG", codec="libx264", pixelformat="yuv444p",
        macro_block_size=1, output_params=["-crf", "4"],
    )
    return path


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
