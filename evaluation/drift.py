"""HiAR drift of one video, with Rolling Forcing's first/last imaging-quality gap and a motion proxy beside it.

Drift (HiAR §9, normalisation and weights our own; the paper publishes none):
1. split the video into `segments` (5) near-equal parts; per segment average each measure
   (DINOv2 cosine and LPIPS over consecutive-frame pairs inside the segment);
2. per measure fit a least-squares line against segment centres x_i = (i + 0.5) / n, so the slope is the fitted
   change from the start to the end of the video;
3. normalise each slope: divide by the measure's natural range (MUSIQ-SPAQ / 100, CLIP-IQA, DINOv2 cosine, LPIPS
   and HSV saturation all lie in [0, 1], so their scale is 1) — except the Laplacian variance, which has no fixed
   range and is divided by its mean over the segments (a relative change);
4. drift = sum_m w_m |normalised slope_m| / sum_m w_m over the available measures, with equal weights w_m = 1.
   Absolute values: a change in either direction is drift (over-saturation and washing out, over-sharpening and
   blur). Lower is better; 0 means no trend. Scores computed over different sets of available measures are not
   comparable, so each result lists the measures it used.

Beside it, never instead of it: Rolling Forcing's |imaging quality(first 5 s) - imaging quality(last 5 s)| (MUSIQ-SPAQ,
VBench imaging_quality scale x 100, i.e. percentage points; windows shrink to half the video when it is shorter than
10 s) and a motion proxy, because low motion flatters every drift measure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from evaluation.measures import fit_slope, frame_difference, segment_bounds, segment_means, to_unit
from evaluation.models import DRIFT_MEASURES, Measure

# normalisation scale of each measure's slope; None = divide by the measure's mean over segments
SLOPE_SCALE: dict[str, float | None] = {
    "musiq": 1.0,
    "clip_iqa": 1.0,
    "dinov2_cos": 1.0,
    "lpips": 1.0,
    "hsv_saturation": 1.0,
    "laplacian_variance": None,
}
DEFAULT_WEIGHTS: dict[str, float] = {name: 1.0 for name in DRIFT_MEASURES}
QUALITY_WINDOW_S = 5.0
MOTION_PROXY_NAME = "motion_proxy_frame_diff"


def normalised_slope(name: str, slope: float, segment_values: list[float]) -> float:
    scale = SLOPE_SCALE[name]
    if scale is None:
        mean = sum(segment_values) / len(segment_values)
        return slope / mean if abs(mean) > 1e-12 else 0.0
    return slope / scale


def drift_score(normalised: Mapping[str, float], weights: Mapping[str, float] | None = None) -> float | None:
    """Weighted mean of |normalised slope| over the measures present in `normalised` (None if there are none)."""
    weights = DEFAULT_WEIGHTS if weights is None else weights
    unknown = set(normalised) - set(weights)
    if unknown:
        raise ValueError(f"no drift weight for measure(s) {sorted(unknown)}")
    total = sum(weights[m] for m in normalised)
    if not normalised or total <= 0:
        return None
    return sum(weights[m] * abs(v) for m, v in normalised.items()) / total


def quality_first_last(per_frame_quality: torch.Tensor, fps: float) -> dict[str, float]:
    """Rolling Forcing's drift: |mean quality of the first window - of the last window| (quality on a 0-1 scale)."""
    t = per_frame_quality.shape[0]
    window = max(1, min(round(QUALITY_WINDOW_S * fps), t // 2))
    first = float(per_frame_quality[:window].double().mean())
    last = float(per_frame_quality[-window:].double().mean())
    return {"first": first, "last": last, "delta_pct": 100.0 * abs(first - last), "window_s": window / fps}


def video_drift(
    frames: torch.Tensor,
    measures: Mapping[str, Measure],
    fps: float,
    segments: int = 5,
    weights: Mapping[str, float] | None = None,
    unavailable: Mapping[str, str] | None = None,
) -> dict:
    """All drift numbers of one video. frames [T, 3, H, W] in [-1, 1]."""
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    x = to_unit(frames)
    bounds = segment_bounds(x.shape[0], segments)
    seg_values: dict[str, list[float]] = {}
    slopes: dict[str, float] = {}
    normalised: dict[str, float] = {}
    musiq_per_frame = None
    for name, measure in measures.items():
        per_frame = measure(x)
        if name == "musiq":
            musiq_per_frame = per_frame
        seg_values[name] = segment_means(per_frame, bounds, pairwise=measure.pairwise)
        slopes[name] = fit_slope(seg_values[name])
        normalised[name] = normalised_slope(name, slopes[name], seg_values[name])
    unavailable = dict(unavailable or {})
    score = drift_score({m: v for m, v in normalised.items() if m in SLOPE_SCALE}, weights)
    return {
        "num_frames": int(x.shape[0]),
        "fps": float(fps),
        "duration_s": x.shape[0] / fps,
        "segment_bounds": [list(b) for b in bounds],
        "segments": seg_values,
        "slopes": slopes,
        "normalised_slopes": normalised,
        "drift": score,
        "drift_measures": sorted(normalised, key=DRIFT_MEASURES.index),
        "imaging_quality_first_last": (
            quality_first_last(musiq_per_frame, fps) if musiq_per_frame is not None else None
        ),
        MOTION_PROXY_NAME: float(frame_difference(x).double().mean()),
        "unavailable": unavailable,
    }


def mean_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return sum(present) / len(present) if present else None
