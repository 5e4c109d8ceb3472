"""Flow matching in one place: noise levels, shifts, x0 <-> v, Euler steps and step lists.

Time t lives in [0, 1000]; sigma = t / 1000; x_t = (1 - sigma) x0 + sigma * noise; the network predicts
v = noise - x0, so x0 = x_t - sigma * v. Conversions run in float64 (as Self-Forcing does) and return the input dtype.
"""

from __future__ import annotations

import functools

import torch

NUM_TRAIN_TIMESTEPS = 1000
SIGMA_LOOKUPS = ("exact", "official_grid")


def shift_sigma(sigma, shift: float):
    """sigma' = s * sigma / (1 + (s - 1) * sigma)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def _sigma(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t as [B], [B, F] (or a scalar) -> sigma broadcastable against latents [B, F, C, H, W], float64."""
    t = torch.as_tensor(t, device=like.device, dtype=torch.float64) / NUM_TRAIN_TIMESTEPS
    if t.dim() == 0:
        return t
    if t.dim() == 1:
        t = t[:, None]
    return t.reshape(*t.shape, *([1] * (like.dim() - t.dim())))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
    s = _sigma(t, x0)
    return ((1 - s) * x0.double() + s * noise.double()).to(x0.dtype)


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t) -> torch.Tensor:
    return (x_t.double() - _sigma(t, x_t) * v.double()).to(x_t.dtype)


def velocity_from_x0(x_t: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
    """v = (x_t - x0) / sigma; undefined at sigma = 0."""
    return ((x_t.double() - x0.double()) / _sigma(t, x_t)).to(x_t.dtype)


def euler_step(x_t: torch.Tensor, v: torch.Tensor, t, t_next) -> torch.Tensor:
    """x_{t'} = x_t + v * (sigma_{t'} - sigma_t)."""
    return (x_t.double() + v.double() * (_sigma(t_next, x_t) - _sigma(t, x_t))).to(x_t.dtype)


def shifted_timesteps(shift: float, num: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The training scheduler's table: sigmas = linspace(1, 0, num + 1)[:-1], shifted, times 1000."""
    sigmas = torch.linspace(1.0, 0.0, num + 1, dtype=torch.float64)[:-1]
    return NUM_TRAIN_TIMESTEPS * shift_sigma(sigmas, shift)


def warp_steps(step_list, shift: float = 5.0) -> torch.Tensor:
    """Few-step student list warped onto the shifted grid: [1000, 750, 500, 250] at shift 5 -> 1000, 937.5, 833.3, 625."""
    table = shifted_timesteps(shift)
    idx = torch.tensor([NUM_TRAIN_TIMESTEPS - int(s) for s in step_list])
    if (idx < 0).any() or (idx >= NUM_TRAIN_TIMESTEPS).any():
        raise ValueError(f"denoising steps must lie in (0, 1000], got {list(step_list)}")
    return table[idx]


def euler_grid(num_steps: int, shift: float) -> torch.Tensor:
    """A teacher ODE grid of num_steps + 1 timesteps from 1000 down to 0 (48 steps, shift 8 for ODE pairs)."""
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
    return torch.cat([NUM_TRAIN_TIMESTEPS * shift_sigma(sigmas, shift), torch.zeros(1, dtype=torch.float64)])


def sample_training_timesteps(batch: int, shift: float, generator=None, device=None,
                              low: float = 0.0, high: float = float(NUM_TRAIN_TIMESTEPS)) -> torch.Tensor:
    """DMD/critic timesteps: t ~ U{0..999}, shifted, clamped to [low, high] (DMD uses shift 5, [20, 980])."""
    u = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=generator, device=device).double()
    u = u / NUM_TRAIN_TIMESTEPS
    return (NUM_TRAIN_TIMESTEPS * shift_sigma(u, shift)).clamp(low, high).float()


@functools.lru_cache(maxsize=8)
def official_grid(shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The official score wrappers' lookup table (Self-Forcing's ``FlowMatchScheduler(shift, sigma_min=0,
    extra_one_step=True)`` after ``set_timesteps(1000)``), computed as it is, in float32: sigmas = linspace(1, 0,
    1001)[:-1] shifted, timesteps = 1000 * sigmas. Returns (timesteps, sigmas), descending, on the CPU."""
    sigmas = shift_sigma(torch.linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1)[:-1], float(shift))
    return sigmas * NUM_TRAIN_TIMESTEPS, sigmas


def grid_sigma(t, shift: float) -> torch.Tensor:
    """The official sigma of timesteps t: that of the grid point nearest to t (argmin |timesteps - t| in float64, the
    first on a tie), float64, shaped like t. The official wrappers convert x0 <-> v with it."""
    timesteps, sigmas = official_grid(float(shift))
    t = torch.as_tensor(t)
    flat = t.reshape(-1).double()
    index = (timesteps.double().to(flat.device)[None] - flat[:, None]).abs().argmin(dim=1)
    return sigmas.double().to(flat.device)[index].reshape(t.shape)


def lookup_timesteps(t: torch.Tensor, lookup: str, shift: float) -> torch.Tensor:
    """The timesteps whose exact sigma (t / 1000, what add_noise and the x0 <-> v conversions use) is ``lookup``'s
    sigma of t: t itself for "exact", 1000 * grid_sigma(t, shift) (float64) for "official_grid"."""
    if lookup == "exact":
        return t
    if lookup == "official_grid":
        return NUM_TRAIN_TIMESTEPS * grid_sigma(t, shift)
    raise ValueError(f"sigma lookup must be one of {SIGMA_LOOKUPS}, got {lookup!r}")
