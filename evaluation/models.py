"""Measures that need pretrained weights, loaded only from a local cache folder (never downloaded).

Layout of the cache folder (`weights_dir`; `conf/eval.yaml` -> `weights_dir`, default `$HIAR_EVAL_WEIGHTS`):

- musiq (needs the optional `pyiqa` package): `musiq/musiq_spaq_ckpt-358bb6af.pth`, the SPAQ checkpoint that
  VBench's imaging_quality uses.
- clip_iqa (torchmetrics + transformers): `clip-vit-base-patch16/`, a Hugging Face CLIP folder with `config.json`,
  `model.safetensors` or `pytorch_model.bin`, `preprocessor_config.json`, and `tokenizer.json` or
  `vocab.json` + `merges.txt`.
- dinov2_cos (transformers): `dinov2-small/`, a Hugging Face DINOv2 folder with `config.json` and
  `model.safetensors` or `pytorch_model.bin`.
- lpips (torchmetrics + torchvision): `torch_hub/checkpoints/alexnet-owt-7be5be79.pth`, torchvision's AlexNet
  (the LPIPS linear layers ship inside torchmetrics).

A measure whose package or files are absent is reported as unavailable with the reason (naming each missing file);
it is never replaced by another model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from evaluation.measures import hsv_saturation, laplacian_variance

# no network at run time, ever
for _flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_flag, "1")

MUSIQ_FILE = "musiq/musiq_spaq_ckpt-358bb6af.pth"
CLIP_DIR = "clip-vit-base-patch16"
DINOV2_DIR = "dinov2-small"
LPIPS_HUB_DIR = "torch_hub"
LPIPS_BACKBONE_FILE = "torch_hub/checkpoints/alexnet-owt-7be5be79.pth"

# the six HiAR drift measures, in report order
DRIFT_MEASURES = ("musiq", "clip_iqa", "dinov2_cos", "lpips", "hsv_saturation", "laplacian_variance")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Measure:
    """A per-frame (or per-consecutive-pair) measure. `fn` maps [N, 3, H, W] in [0, 1] to [N] (pairwise: [N-1])."""

    name: str
    fn: object
    pairwise: bool = False

    def __call__(self, frames01: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        if not self.pairwise:
            return torch.cat([self.fn(chunk).float().cpu().reshape(-1) for chunk in frames01.split(batch_size)])
        out = []
        for start in range(0, frames01.shape[0] - 1, batch_size):
            a = frames01[start : start + batch_size]
            b = frames01[start + 1 : start + 1 + batch_size]
            a = a[: b.shape[0]]
            out.append(self.fn(a, b).float().cpu().reshape(-1))
        return torch.cat(out)


def _hf_weights_missing(folder: Path, extra: tuple[str, ...] = ()) -> list[str]:
    missing = [str(folder / "config.json")] if not (folder / "config.json").is_file() else []
    if not any((folder / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        missing.append(f"{folder / 'model.safetensors'} (or pytorch_model.bin)")
    missing += [str(folder / f) for f in extra if not (folder / f).is_file()]
    return missing


def _clip_tokenizer_missing(folder: Path) -> list[str]:
    bpe_files = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if (folder / "tokenizer.json").is_file() or bpe_files:
        return []
    return [f"{folder / 'tokenizer.json'} (or vocab.json + merges.txt)"]


def _package_missing(name: str) -> str | None:
    return None if importlib.util.find_spec(name) is not None else f"the `{name}` package is not installed"


def _unavailable_reason(name: str, root: Path) -> str | None:
    """Why `name` cannot run with the weights under `root`, or None when it can."""
    if name in ("hsv_saturation", "laplacian_variance"):
        return None
    if name == "musiq":
        missing = [str(root / MUSIQ_FILE)] if not (root / MUSIQ_FILE).is_file() else []
        package = _package_missing("pyiqa")
    elif name == "clip_iqa":
        missing = _hf_weights_missing(root / CLIP_DIR, ("preprocessor_config.json",))
        missing += _clip_tokenizer_missing(root / CLIP_DIR)
        package = _package_missing("transformers")
    elif name == "dinov2_cos":
        missing = _hf_weights_missing(root / DINOV2_DIR)
        package = _package_missing("transformers")
    elif name == "lpips":
        missing = [str(root / LPIPS_BACKBONE_FILE)] if not (root / LPIPS_BACKBONE_FILE).is_file() else []
        package = _package_missing("torchvision")
    else:
        raise ValueError(f"unknown measure {name!r}; known: {', '.join(DRIFT_MEASURES)}")
    reasons = ([package] if package else []) + ([f"missing weights: {', '.join(missing)}"] if missing else [])
    return "; ".join(reasons) or None


def _resize_longer(frames01: torch.Tensor, longest: int) -> torch.Tensor:
    h, w = frames01.shape[-2:]
    if max(h, w) <= longest:
        return frames01
    scale = longest / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(frames01, size=size, mode="bilinear", align_corners=False, antialias=True)


def _load_musiq(root: Path, device: torch.device) -> Measure:
    import pyiqa

    net = pyiqa.create_metric("musiq-spaq", device=device, pretrained_model_path=str(root / MUSIQ_FILE))

    def fn(x: torch.Tensor) -> torch.Tensor:
        # VBench imaging_quality: longer side resized to <= 512, MUSIQ-SPAQ score / 100 (0-1 scale)
        return net(_resize_longer(x.to(device), 512)) / 100.0

    return Measure("musiq", fn)


def _load_clip_iqa(root: Path, device: torch.device) -> Measure:
    from torchmetrics.multimodal import CLIPImageQualityAssessment
    from transformers import CLIPModel, CLIPProcessor

    folder = str(root / CLIP_DIR)
    loader = lambda: (
        CLIPModel.from_pretrained(folder, local_files_only=True),
        CLIPProcessor.from_pretrained(folder, local_files_only=True),
    )
    metric = CLIPImageQualityAssessment(model_name_or_path=loader, data_range=1.0, prompts=("quality",)).to(device)

    def fn(x: torch.Tensor) -> torch.Tensor:
        metric.reset()
        metric.update(x.to(device))
        return metric.compute().reshape(-1)

    return Measure("clip_iqa", fn)


def _load_dinov2(root: Path, device: torch.device) -> Measure:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(root / DINOV2_DIR), local_files_only=True).to(device).eval()
    mean = torch.tensor(_IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def embed(x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x.to(device), size=(224, 224), mode="bicubic", align_corners=False).clamp(0, 1)
        return model(pixel_values=(x - mean) / std).pooler_output

    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(embed(a), embed(b), dim=-1)

    return Measure("dinov2_cos", fn, pairwise=True)


@contextlib.contextmanager
def _torch_hub_dir(path: Path) -> Iterator[None]:
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(path))
    try:
        yield
    finally:
        torch.hub.set_dir(previous)


def _load_lpips(root: Path, device: torch.device) -> Measure:
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    # the AlexNet file was checked to exist under this hub dir, so torchvision reads it and downloads nothing
    with _torch_hub_dir(root / LPIPS_HUB_DIR):
        metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="mean", normalize=True).to(device)
    net = metric.net

    def prepare(x: torch.Tensor) -> torch.Tensor:
        # AlexNet's strides need >= 64 px: tiny (toy-world) frames are upsampled, larger ones kept as they are
        h, w = x.shape[-2:]
        if min(h, w) < 64:
            scale = 64 / min(h, w)
            x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", align_corners=False)
        return x.to(device).clamp(0, 1)

    @torch.no_grad()
    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return net(prepare(a), prepare(b), normalize=True).reshape(-1)

    return Measure("lpips", fn, pairwise=True)


_LOADERS = {"musiq": _load_musiq, "clip_iqa": _load_clip_iqa, "dinov2_cos": _load_dinov2, "lpips": _load_lpips}


def load_measures(
    weights_dir: str | os.PathLike | None, names: tuple[str, ...] = DRIFT_MEASURES, device: str | torch.device = "cpu"
) -> tuple[dict[str, Measure], dict[str, str]]:
    """-> (available measures by name, {unavailable name: reason}). Nothing is ever downloaded."""
    device = torch.device(device)
    root = Path(weights_dir).expanduser() if weights_dir else None
    available: dict[str, Measure] = {}
    unavailable: dict[str, str] = {}
    for name in names:
        if name == "hsv_saturation":
            available[name] = Measure(name, hsv_saturation)
        elif name == "laplacian_variance":
            available[name] = Measure(name, laplacian_variance)
        elif root is None:
            _unavailable_reason(name, Path("."))  # validates the name
            unavailable[name] = "no weights_dir configured (set weights_dir= or HIAR_EVAL_WEIGHTS)"
        elif (reason := _unavailable_reason(name, root)) is not None:
            unavailable[name] = reason
        else:
            available[name] = _LOADERS[name](root, device)
    return available, unavailable
