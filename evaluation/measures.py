"""Hand-written per-frame measures, segmenting and slope fitting (no weights needed).

Frames enter as [T, 3, H, W] floats in [0, 1] (`to_unit` converts the framework's [-1, 1] pixels).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# ITU-R BT.601 luma, the weights OpenCV's RGB->gray conversion uses
_LUMA = (0.299, 0.587, 0.114)
# the 4-neighbour Laplacian (OpenCV's cv2.Laplacian with ksize=1)
_LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))


def to_unit(frames: torch.Tensor) -> torch.Tensor:
    """[-1, 1] pixels -> [0, 1] float32, checking the layout [T, 3, H, W]."""
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"expected frames [T, 3, H, W], got shape {tuple(frames.shape)}")
    return ((frames.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def grayscale(frames01: torch.Tensor) -> torch.Tensor:
    """[T, 3, H, W] in [0, 1] -> [T, 1, H, W] luma."""
    weights = frames01.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (frames01 * weights).sum(dim=1, keepdim=True)


def hsv_saturation(frames01: torch.Tensor) -> torch.Tensor:
    """Mean HSV saturation per frame, [T]: S = (max - min) / max over RGB, 0 where max = 0."""
    cmax = frames01.amax(dim=1)
    cmin = frames01.amin(dim=1)
    sat = torch.where(cmax > 0, (cmax - cmin) / cmax.clamp_min(1e-12), torch.zeros_like(cmax))
    return sat.flatten(1).mean(dim=1)


def laplacian_variance(frames01: torch.Tensor) -> torch.Tensor:
    """Sharpness per frame, [T]: variance of the Laplacian of the 8-bit-scaled luma (valid region, no padding)."""
    if frames01.shape[-1] < 3 or frames01.shape[-2] < 3:
        raise ValueError(f"laplacian_variance needs frames of at least 3x3 pixels, got {tuple(frames01.shape[-2:])}")
    gray = grayscale(frames01) * 255.0
    kernel = gray.new_tensor(_LAPLACIAN).view(1, 1, 3, 3)
    lap = F.conv2d(gray, kernel)
    return lap.flatten(1).var(dim=1, unbiased=False)


def frame_difference(frames01: torch.Tensor) -> torch.Tensor:
    """Mean absolute luma difference of consecutive frames, [T-1] (0 for a static video)."""
    gray = grayscale(frames01)
    return (gray[1:] - gray[:-1]).abs().flatten(1).mean(dim=1)


def segment_bounds(num_frames: int, segments: int) -> list[tuple[int, int]]:
    """`segments` contiguous, near-equal [start, end) frame ranges covering all frames (sizes differ by <= 1).

    Every segment needs at least 2 frames, since the consecutive-frame measures compare pairs inside a segment.
    """
    if segments < 2:
        raise ValueError(f"segments must be >= 2 to fit a slope, got {segments}")
    if num_frames < 2 * segments:
        raise ValueError(f"a video of {num_frames} frames is too short for {segments} segments of >= 2 frames")
    edges = [round(i * num_frames / segments) for i in range(segments + 1)]
    return list(zip(edges[:-1], edges[1:]))


def segment_means(per_frame: torch.Tensor, bounds: Sequence[tuple[int, int]], pairwise: bool = False) -> list[float]:
    """Average a per-frame series over each segment.

    pairwise: the series holds one value per consecutive pair (t, t+1), index t; a segment [s, e) owns the pairs
    with both frames inside it, so pairs that straddle a boundary are left out.
    """
    out = []
    for start, end in bounds:
        values = per_frame[start : end - 1] if pairwise else per_frame[start:end]
        out.append(float(values.double().mean()))
    return out


def fit_slope(values: Sequence[float]) -> float:
    """Least-squares slope of `values` against segment centres x_i = (i + 0.5) / n.

    x spans the video as a fraction of its length, so the slope is the fitted change of the measure from the start to
    the end of the video, independent of the number of segments.
    """
    n = len(values)
    if n < 2:
        raise ValueError("a slope needs at least two segment values")
    y = torch.tensor(list(values), dtype=torch.float64)
    x = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())
