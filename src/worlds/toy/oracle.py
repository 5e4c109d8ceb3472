"""The toy world's exact oracle: scores any video [T, 3, H, W] in [-1, 1] against its prompt alone.

The frame is a torus (src/worlds/toy/shapes.py): neighbourhoods, components, centroids and steps all wrap around.
Per frame: colour segmentation against the prompted background (after a 3x3 median filter, which removes speckles),
the largest 4-connected foreground component, its core colour, the background colour error, the coverage-weighted
centroid and the best-matching shape template. The object is *found* when that component has a plausible area and its
colour is the prompted one (nearest palette colour and within COLOR_TOLERANCE).

Per video:
* object_found: fraction of frames with the right-colour object.
* object_color_error / background_color_error: mean L2 colour distance in [-1, 1] units (noise raises the latter).
* shape_agreement: fraction of frames with the object found whose coverage is closest to the prompted shape's.
* speckle: fraction of background pixels (away from the object) off the prompted background colour by > SPECKLE_DISTANCE.
* motion: the speed, mean centroid displacement in pixels (of a 16 x 16 frame) per frame (VBench's dynamic degree
  analogue); dynamic = motion > 0.25.
* smoothness: fraction of frame triples with the object found and |second difference| < SMOOTH_TOLERANCE px.
* direction_agreement: fraction of steps that move along the prompted axis in the prompted sense (a step without the
  object in both frames disagrees). The world has no walls, so this is the same at second 1 and second 20.
* fidelity: 1 if object_found >= FOUND_FRACTION and direction_agreement >= DIRECTION_THRESHOLD, else 0.
Over `segments` equal runs of frames (5: 4 s each of a 20 s video) the same measures are reported per segment, with
their drift (least-squares slope per segment and last-minus-first difference): quality lost over time (colour,
shape, speckle, fidelity) is read apart from motion lost over time (speed, direction). Ground-truth videos score
perfectly.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from src.worlds.toy.shapes import (
    BACKGROUND_COLORS,
    DIRECTIONS,
    OBJECT_COLORS,
    RADIUS,
    REFERENCE_SIZE,
    SHAPES,
    coverage,
    parse_prompt,
    to_signed,
    validate_attributes,
    wrapped,
)

FOREGROUND_DISTANCE = 0.5  # colour distance from the background that marks foreground
CORE_FRACTION = 0.95  # pixels this close to the component's most distinct colour define the object colour
COLOR_TOLERANCE = 0.5  # palette colours are >= 1.0 apart
AREA_RANGE = (0.35, 3.0)  # component area relative to the shapes' area
MIN_STEP = 0.15  # pixels (of a 16 x 16 frame): smaller displacements count as not moving
SMOOTH_TOLERANCE = 0.35  # pixels
SPECKLE_DISTANCE = 0.25  # colour distance from the background that makes a background pixel a speckle
DYNAMIC_THRESHOLD = 0.25  # pixels per frame
FOUND_FRACTION = 0.9
DIRECTION_THRESHOLD = 0.8
MEASURES = ("fidelity", "object_found", "object_color_error", "shape_agreement", "background_color_error", "speckle",
            "motion", "smoothness", "direction_agreement")

_PALETTE_NAMES = list(OBJECT_COLORS)
_PALETTE = torch.stack([to_signed(c) for c in OBJECT_COLORS.values()])


def median_filter3(frames: torch.Tensor) -> torch.Tensor:
    """3x3 median per channel on the torus; [T, C, H, W] -> same."""
    t, c, h, w = frames.shape
    padded = F.pad(frames.reshape(t * c, 1, h, w), (1, 1, 1, 1), mode="circular")
    patches = F.unfold(padded, 3)  # [T*C, 9, H*W]
    return patches.median(dim=1).values.view(t, c, h, w)


def largest_components(mask: torch.Tensor) -> torch.Tensor:
    """Per frame, the largest 4-connected component (on the torus) of a boolean mask [T, H, W] (ties: the first found)."""
    t, h, w = mask.shape
    index = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w).expand(t, h, w)
    labels = torch.where(mask, index, torch.zeros(()))
    while True:  # propagate the largest index through each component until stable
        padded = F.pad(labels[:, None], (1, 1, 1, 1), mode="circular")[:, 0]
        neighbours = torch.stack(
            [labels, padded[:, :-2, 1:-1], padded[:, 2:, 1:-1], padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]]
        )
        updated = torch.where(mask, neighbours.amax(0), torch.zeros(()))
        if torch.equal(updated, labels):
            break
        labels = updated
    out = torch.zeros_like(mask)
    for i in range(t):
        values, counts = labels[i][mask[i]].unique(return_counts=True)
        if len(values):
            out[i] = labels[i] == values[counts.argmax()]
    return out


def analyse_frames(frames: torch.Tensor, attrs: dict) -> dict:
    """Per-frame measurements (numpy arrays over T)."""
    t, _, h, w = frames.shape
    obj = to_signed(OBJECT_COLORS[attrs["color"]])
    bg = to_signed(BACKGROUND_COLORS[attrs["background"]])
    filtered = median_filter3(frames)
    distance = (filtered - bg[None, :, None, None]).norm(dim=1)  # [T, H, W]
    component = largest_components(distance > FOREGROUND_DISTANCE)
    area = component.flatten(1).sum(1).float()
    expected_area = math.pi * (RADIUS * min(h, w) / REFERENCE_SIZE) ** 2

    raw_distance = (frames - bg[None, :, None, None]).norm(dim=1)
    colors = bg.expand(t, 3).clone()  # no foreground at all reads as an object of the background colour
    for i in range(t):
        if area[i] > 0:  # the core: median-filtered pixels most distinct from the background (fully covered ones)
            dist = distance[i][component[i]]
            core = dist >= CORE_FRACTION * dist.max()
            colors[i] = filtered[i].permute(1, 2, 0)[component[i]][core].mean(0)
    color_error = (colors - obj).norm(dim=1)
    nearest = torch.cdist(colors, _PALETTE).argmin(1)
    right_color = (nearest == _PALETTE_NAMES.index(attrs["color"])) & (color_error < COLOR_TOLERANCE)
    plausible = (area >= AREA_RANGE[0] * expected_area) & (area <= AREA_RANGE[1] * expected_area)
    found = right_color & plausible

    # the object's neighbourhood: its component grown by 2 px (the median filter can trim a corner's faint pixels)
    dilated = F.max_pool2d(F.pad(component[:, None].float(), (2, 2, 2, 2), mode="circular"), 5, stride=1)[:, 0] > 0
    background = ~dilated
    bg_count = background.flatten(1).sum(1).clamp(min=1)
    bg_error = (raw_distance * background).flatten(1).sum(1) / bg_count
    speckle = ((raw_distance > SPECKLE_DISTANCE) & background).flatten(1).sum(1) / bg_count

    # coverage of each pixel by the object, from its position on the background -> object colour line
    direction = colors - bg
    alpha = torch.einsum("tchw,tc->thw", frames - bg[None, :, None, None], direction)
    alpha = (alpha / direction.square().sum(1).clamp(min=1e-6)[:, None, None]).clamp(0, 1) * dilated
    position = torch.stack([_centroid(alpha.sum(1), w), _centroid(alpha.sum(2), h)], 1)

    # the shape whose coverage at that centroid is closest to the measured one
    mismatch = torch.stack([(alpha - coverage(shape, position, h, w)).abs().flatten(1).sum(1) for shape in SHAPES], 1)
    right_shape = mismatch.argmin(1) == SHAPES.index(attrs["shape"])

    position = position.numpy().astype(np.float64)
    position[~found.numpy()] = np.nan
    return {
        "found": found.numpy(),
        "object_color_error": color_error.numpy().astype(np.float64),
        "right_shape": (right_shape & found).numpy(),
        "background_color_error": bg_error.numpy().astype(np.float64),
        "speckle": speckle.numpy().astype(np.float64),
        "position": position,
        "size": (w, h),
        "scale": min(h, w) / REFERENCE_SIZE,
    }


def _centroid(mass: torch.Tensor, period: int) -> torch.Tensor:
    """Centre of mass [T] of mass [T, period] on a circle: the circular mean places it, then the mean of the positions
    unwrapped around it (exact for a compact object, which the circular mean alone is not)."""
    cells = torch.arange(period, dtype=torch.float32) + 0.5
    angle = cells * (2 * math.pi / period)
    total = mass.sum(1).clamp(min=1e-6)
    rough = torch.atan2((mass * angle.sin()).sum(1), (mass * angle.cos()).sum(1)) * (period / (2 * math.pi))
    unwrapped = rough[:, None] + wrapped(cells[None, :] - rough[:, None], period)
    return torch.remainder((mass * unwrapped).sum(1) / total, period)


def step_measures(per_frame: dict, attrs: dict) -> dict:
    """Per step k (frame k -> k + 1) and per triple centred at k: motion, direction agreement, smoothness."""
    pos, size, scale = per_frame["position"], np.array(per_frame["size"], dtype=np.float64), per_frame["scale"]
    dx, dy = DIRECTIONS[attrs["direction"]]
    axis, sense = (0, dx) if dx else (1, dy)
    steps = wrapped(np.diff(pos, axis=0), size)  # NaN where either frame lacks the object
    valid = ~np.isnan(steps).any(1)
    displacement = np.where(valid, np.linalg.norm(np.nan_to_num(steps), axis=1), np.nan)
    along, across = np.nan_to_num(steps[:, axis]), np.nan_to_num(steps[:, 1 - axis])
    moving = (np.abs(along) >= MIN_STEP * scale) & (np.abs(along) >= np.abs(across))
    agree = valid & moving & (np.sign(along) == sense)

    triples = np.diff(steps, axis=0)  # second differences of the wrapped steps
    accel = np.linalg.norm(np.nan_to_num(triples, nan=np.inf), axis=1)
    smooth = ~np.isnan(triples).any(1) & (accel < SMOOTH_TOLERANCE * scale)
    return {"displacement": displacement / scale, "agree": agree.astype(float), "smooth": smooth.astype(float)}


def _summarise(per_frame: dict, per_step: dict, frames: np.ndarray, steps: np.ndarray, triples: np.ndarray) -> dict:
    found = float(per_frame["found"][frames].mean())
    displacement = per_step["displacement"][steps]
    displacement = displacement[~np.isnan(displacement)]
    direction = float(per_step["agree"][steps].mean()) if len(steps) else 0.0
    found_frames = per_frame["found"][frames].sum()
    return {
        "fidelity": float(found >= FOUND_FRACTION and direction >= DIRECTION_THRESHOLD),
        "object_found": found,
        "object_color_error": float(per_frame["object_color_error"][frames].mean()),
        "shape_agreement": float(per_frame["right_shape"][frames].sum() / found_frames) if found_frames else 0.0,
        "background_color_error": float(per_frame["background_color_error"][frames].mean()),
        "speckle": float(per_frame["speckle"][frames].mean()),
        "motion": float(displacement.mean()) if len(displacement) else 0.0,
        "smoothness": float(per_step["smooth"][triples].mean()) if len(triples) else 0.0,
        "direction_agreement": direction,
    }


def drift(segment_values: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Least-squares slope per segment and last-minus-first difference of each measure."""
    out = {}
    for name, values in segment_values.items():
        values = np.asarray(values, dtype=np.float64)
        slope = float(np.polyfit(np.arange(len(values)), values, 1)[0]) if len(values) > 1 else 0.0
        out[name] = {"slope": slope, "first_last": float(values[-1] - values[0])}
    return out


def _attributes(prompt_or_attrs) -> dict:
    if isinstance(prompt_or_attrs, str):
        return parse_prompt(prompt_or_attrs)
    return validate_attributes(dict(prompt_or_attrs))


def score_video(frames: torch.Tensor, prompt_or_attrs, segments: int = 5) -> dict:
    """Scores one video [T, 3, H, W] in [-1, 1] against its prompt (or attribute dict); see the module docstring."""
    frames = torch.as_tensor(frames).detach().float().cpu().clamp(-1, 1)  # what a video file holds
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be [T, 3, H, W], got {tuple(frames.shape)}")
    num_frames = frames.shape[0]
    if segments < 1 or num_frames < 3 * segments:
        raise ValueError(
            f"need segments >= 1 and at least 3 frames per segment, got {num_frames} frames and {segments} segments"
        )
    attrs = _attributes(prompt_or_attrs)
    per_frame = analyse_frames(frames, attrs)
    per_step = step_measures(per_frame, attrs)
    all_frames = np.arange(num_frames)
    result = _summarise(per_frame, per_step, all_frames, all_frames[:-1], all_frames[:-2])
    result["dynamic"] = float(result["motion"] > DYNAMIC_THRESHOLD)
    per_segment = {name: [] for name in MEASURES}
    for chunk in np.array_split(all_frames, segments):
        steps = chunk[chunk < num_frames - 1]
        triples = chunk[(chunk >= 1) & (chunk < num_frames - 1)] - 1  # triple index = centre frame - 1
        for name, value in _summarise(per_frame, per_step, chunk, steps, triples).items():
            per_segment[name].append(value)
    result["segments"] = per_segment
    result["drift"] = drift(per_segment)
    return result


def score_videos(videos, prompts: list, segments: int = 5) -> dict:
    """Means over videos of every per-video scalar, per-segment means, and the drift of those means."""
    if len(videos) != len(prompts) or not len(prompts):
        raise ValueError(f"need as many videos as prompts (and at least one), got {len(videos)} and {len(prompts)}")
    return summarise_scores([score_video(v, p, segments) for v, p in zip(videos, prompts)])


def standard_error(values, axis: int = 0) -> np.ndarray:
    """Standard error of the mean along `axis` (0 for a single value: no spread is known)."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[axis]
    return values.std(axis=axis, ddof=1) / np.sqrt(n) if n > 1 else np.zeros_like(values.mean(axis=axis))


def summarise_scores(scores: list[dict]) -> dict:
    """Aggregate `score_video` results: means of every scalar, per-segment means with their standard errors over
    videos, and their drift."""
    if not scores:
        raise ValueError("no video scores to summarise")
    scalars = [k for k in scores[0] if k not in ("segments", "drift")]
    result = {k: float(np.mean([s[k] for s in scores])) for k in scalars}
    result["num_videos"] = len(scores)
    result["segments"] = {m: np.mean([s["segments"][m] for s in scores], axis=0).tolist() for m in MEASURES}
    result["segments_se"] = {m: standard_error([s["segments"][m] for s in scores]).tolist() for m in MEASURES}
    result["drift"] = drift(result["segments"])
    return result
