"""Procedural text-to-video data: one soft-edged shape moving on a flat background, and its plain-English prompt.

Attributes are what the prompt says: {"shape", "color", "background", "direction"}. The seed passed to
`render_video` picks what it does not say (start position, speed).

The world is *stationary*, as real video is: the frame is a torus (an object leaving one edge re-enters at the
opposite one, so a left-moving object keeps moving left forever), the velocity is constant, and the start is uniform
over the frame. Every window of a long video is then distributed like a training clip: frames 60-80 of a 20 s video
are as likely as frames 0-20, so a model trained on 5 s clips has seen everything a long rollout should show, and
quality lost over a long video is drift, not a world the model never saw. (The Wan DiT has only relative RoPE
positions, but the wrap is within its reach: offset +W-1 exists only from the first column.)

Time base: like Wan's latent timeline, 4 frames per second plus the first (`num_frames(seconds)`): 21 frames = 5 s,
81 frames = 20 s. Pixels are [T, 3, H, W] in [-1, 1].
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle")
# RGB in [0, 1]; object colours are saturated and every one is far (>= 0.65 in [-1, 1] units) from every background.
OBJECT_COLORS = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.15, 0.35, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
    "orange": (1.0, 0.5, 0.0),
    "white": (1.0, 1.0, 1.0),
}
BACKGROUND_COLORS = {
    "black": (0.0, 0.0, 0.0),
    "dark blue": (0.0, 0.0, 0.35),
    "dark green": (0.0, 0.3, 0.0),
    "gray": (0.5, 0.5, 0.5),
}
# unit vectors in (x, y) pixel coordinates, y pointing down
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

ATTRIBUTE_VALUES = {"shape": SHAPES, "color": OBJECT_COLORS, "background": BACKGROUND_COLORS, "direction": DIRECTIONS}

REFERENCE_SIZE = 16  # radius and speed below are in pixels of a 16 x 16 frame and scale with the frame
RADIUS = 3.0  # every shape has the area of a circle of this radius
SPEED_RANGE = (0.3, 0.5)  # pixels per frame: 32-53 frames (8-13 s) per lap of a 16-pixel frame
FPS = 4  # frames per second (Wan's latent frame rate: 16 fps pixels, 4x temporal compression)
WORLD = "torus"  # edges wrap around (before 2026-12: walls that reflect; shards record which)
SUPERSAMPLING = 4  # coverage samples per pixel side (anti-aliased edges)
NUM_HELDOUT = 48
HELDOUT_SEED = 20240601

PROMPT_PATTERN = re.compile(r"^an? (\w+) (\w+) moving (\w+) on an? ([\w ]+?) background$")
WORDS = sorted(
    {"a", "an", "moving", "on", "background"}
    | set(SHAPES)
    | set(DIRECTIONS)
    | {w for name in list(OBJECT_COLORS) + list(BACKGROUND_COLORS) for w in name.split()}
)


def generator_fingerprint() -> str:
    """A short hash of every constant that shapes a rendered video: shards record it, readers check it."""
    constants = [WORLD, SHAPES, OBJECT_COLORS, BACKGROUND_COLORS, DIRECTIONS, REFERENCE_SIZE, RADIUS, SPEED_RANGE,
                 SUPERSAMPLING]
    return hashlib.sha256(json.dumps(constants, sort_keys=True).encode()).hexdigest()[:16]


def num_frames(seconds: float) -> int:
    """Frames of a video that lasts `seconds` (the first frame at t=0, then FPS per second): 5 s -> 21, 20 s -> 81."""
    if seconds < 0:
        raise ValueError(f"seconds must be >= 0, got {seconds}")
    return round(seconds * FPS) + 1


def to_signed(rgb) -> torch.Tensor:
    """RGB in [0, 1] -> [-1, 1] float tensor [3]."""
    return torch.tensor(rgb, dtype=torch.float32) * 2 - 1


def all_attributes() -> list[dict]:
    """Every attribute combination, in a fixed order."""
    return [
        {"shape": s, "color": c, "background": b, "direction": d}
        for s, c, b, d in itertools.product(SHAPES, OBJECT_COLORS, BACKGROUND_COLORS, DIRECTIONS)
    ]


def _heldout_combinations() -> list[dict]:
    combos = all_attributes()
    order = np.random.default_rng(HELDOUT_SEED).permutation(len(combos))
    return [combos[i] for i in order[:NUM_HELDOUT]]


_HELDOUT = _heldout_combinations()
_HELDOUT_KEYS = {tuple(a.values()) for a in _HELDOUT}
TRAIN_ATTRIBUTES = [a for a in all_attributes() if tuple(a.values()) not in _HELDOUT_KEYS]


def heldout_prompts(n: int = 32) -> list[str]:
    """The first n of a fixed set of attribute combinations that training never samples."""
    if not 0 < n <= NUM_HELDOUT:
        raise ValueError(f"n must be in 1..{NUM_HELDOUT}, got {n}")
    return [prompt_from_attributes(a) for a in _HELDOUT[:n]]


def training_attributes(fixed: dict | None = None) -> list[dict]:
    """The training attribute combinations that agree with `fixed` (e.g. {"color": "red"}); raises if none does."""
    fixed = fixed or {}
    unknown = set(fixed) - set(ATTRIBUTE_VALUES)
    if unknown:
        raise ValueError(f"unknown attributes {sorted(unknown)}; expected some of {list(ATTRIBUTE_VALUES)}")
    matching = [a for a in TRAIN_ATTRIBUTES if all(a[k] == v for k, v in fixed.items())]
    if not matching:
        raise ValueError(f"no training attribute combination has {fixed} (unknown values, or all held out)")
    return matching


def sample_attributes(rng: np.random.Generator, fixed: dict | None = None) -> dict:
    """A training attribute combination (never a held-out one), uniformly among those that agree with `fixed`."""
    choices = training_attributes(fixed) if fixed else TRAIN_ATTRIBUTES
    return dict(choices[int(rng.integers(len(choices)))])


def validate_attributes(attrs: dict) -> dict:
    if set(attrs) != set(ATTRIBUTE_VALUES):
        raise ValueError(f"attributes must have exactly the keys {sorted(ATTRIBUTE_VALUES)}, got {sorted(attrs)}")
    for key, allowed in ATTRIBUTE_VALUES.items():
        if attrs[key] not in allowed:
            raise ValueError(f"unknown {key} {attrs[key]!r}; expected one of {list(allowed)}")
    return attrs


def prompt_from_attributes(attrs: dict) -> str:
    validate_attributes(attrs)
    article = "an" if attrs["color"][0] in "aeiou" else "a"
    return f"{article} {attrs['color']} {attrs['shape']} moving {attrs['direction']} on a {attrs['background']} background"


TRAINING_PROMPTS = 4096  # the toy world's "prompt file": this many procedural prompts unless told otherwise


def training_prompts(num_prompts: int | None = None, seed: int = 0) -> list[str]:
    """The toy world's training prompt source (``world.training.prompts``): ``num_prompts`` procedural prompts (default
    TRAINING_PROMPTS), never a held-out one."""
    rng = np.random.default_rng(seed)
    return [prompt_from_attributes(sample_attributes(rng)) for _ in range(num_prompts or TRAINING_PROMPTS)]


def parse_prompt(prompt: str) -> dict:
    """The inverse of `prompt_from_attributes` (case and surrounding spaces ignored)."""
    match = PROMPT_PATTERN.match(" ".join(prompt.lower().split()))
    if match is None:
        raise ValueError(
            f"not a toy-world prompt: {prompt!r} (expected 'a <color> <shape> moving <direction> on a <bg> background')"
        )
    color, shape, direction, background = match.groups()
    return validate_attributes({"shape": shape, "color": color, "background": background, "direction": direction})


def shape_extents(shape: str, radius: float) -> tuple[float, float, float, float]:
    """Extents of the shape around its centroid: (left, right, up, down), in pixels."""
    if shape == "circle":
        return radius, radius, radius, radius
    if shape == "square":
        half = radius * math.sqrt(math.pi) / 2
        return half, half, half, half
    side = radius * math.sqrt(4 * math.pi / math.sqrt(3))  # equilateral, apex up, same area as the circle
    circumradius = side / math.sqrt(3)
    return side / 2, side / 2, circumradius, circumradius / 2


def _inside(shape: str, dx: torch.Tensor, dy: torch.Tensor, radius: float) -> torch.Tensor:
    if shape == "circle":
        return dx.square() + dy.square() <= radius**2
    if shape == "square":
        half = radius * math.sqrt(math.pi) / 2
        return (dx.abs() <= half) & (dy.abs() <= half)
    side = radius * math.sqrt(4 * math.pi / math.sqrt(3))
    circumradius = side / math.sqrt(3)
    # apex at (0, -R), base at y = R/2; the slanted edges satisfy |dx| <= (y + R) / sqrt(3)
    return (dy <= circumradius / 2) & (dx.abs() * math.sqrt(3) <= dy + circumradius)


def wrapped(delta, period):
    """The shortest signed difference on a circle of length `period` (numpy arrays or tensors): in [-period/2, period/2)."""
    return (delta + period / 2) % period - period / 2


def trajectory(attrs: dict, num_frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """Centroid (x, y) per frame [T, 2] in pixel units, in [0, W) x [0, H) (pixel j covers [j, j + 1])."""
    validate_attributes(attrs)
    scale = min(height, width) / REFERENCE_SIZE
    left, right, up, down = shape_extents(attrs["shape"], RADIUS * scale)
    if max(left, right) >= width / 2 or max(up, down) >= height / 2:
        raise ValueError(f"a {height}x{width} frame is too small for the shapes")
    rng = np.random.default_rng(seed)
    speed = rng.uniform(SPEED_RANGE[0] * scale, SPEED_RANGE[1] * scale)
    velocity = np.array(DIRECTIONS[attrs["direction"]], dtype=np.float64) * speed
    start = rng.uniform((0, 0), (width, height))
    straight = start[None, :] + np.arange(num_frames)[:, None] * velocity[None, :]
    return np.mod(straight, (width, height))


def coverage(shape: str, centers: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The fraction of each pixel the shape covers [T, H, W], centred at centers [T, 2] (x, y) on the torus."""
    radius = RADIUS * min(height, width) / REFERENCE_SIZE
    s = SUPERSAMPLING
    ys = (torch.arange(height * s, dtype=torch.float32) + 0.5) / s
    xs = (torch.arange(width * s, dtype=torch.float32) + 0.5) / s
    dx = wrapped(xs[None, None, :] - centers[:, 0, None, None], width)  # the torus: the nearest copy of the centre
    dy = wrapped(ys[None, :, None] - centers[:, 1, None, None], height)
    inside = _inside(shape, dx, dy, radius).float()  # [T, H*s, W*s]
    return torch.nn.functional.avg_pool2d(inside[:, None], s)[:, 0]


def render_video(attrs: dict, num_frames: int, height: int = 16, width: int = 16, seed: int = 0) -> torch.Tensor:
    """The video [T, 3, H, W] in [-1, 1] for the attributes; the seed picks start position and speed."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    centers = torch.from_numpy(trajectory(attrs, num_frames, height, width, seed)).float()
    covered = coverage(attrs["shape"], centers, height, width)[:, None]  # [T, 1, H, W]
    obj = to_signed(OBJECT_COLORS[attrs["color"]])[None, :, None, None]
    bg = to_signed(BACKGROUND_COLORS[attrs["background"]])[None, :, None, None]
    return bg + covered * (obj - bg)
