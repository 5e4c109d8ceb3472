"""The one sampling primitive and the cache operations around it.

``denoise_chunk``: denoise this chunk of frames at these (per-frame) timesteps through this cache, optionally
writing the cache -- one model forward. Every sampler order (block-first, step-first, hybrid, training rollouts, a
pipelined sampler) is a schedule of calls to it; ``write_context`` and ``recache`` are the same forward used only
for its cache write, and ``fused_velocity`` is one forward that carries a cache write and the next block's denoise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from src.flow_matching import add_noise, euler_step, x0_from_velocity


def frame_timesteps(t, x: torch.Tensor) -> torch.Tensor:
    """A timestep (float) or per-frame timesteps ([B, F] or [F]) -> [B, F] float32 on x's device."""
    b, f = x.shape[:2]
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    if t.dim() == 0:
        return t.expand(b, f)
    if t.dim() == 1 and t.shape[0] == f:
        return t[None].expand(b, f)
    if t.shape != (b, f):
        raise ValueError(f"timesteps must be a float, [F] or [B, F] = [{b}, {f}], got {tuple(t.shape)}")
    return t


def denoise_chunk(
    model,
    x: torch.Tensor,
    t,
    context: torch.Tensor,
    *,
    cache=None,
    start_frame: int = 0,
    frames_per_block: int | None = None,
    write_cache: bool | int = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward: x [B, f, C, h, w] at timestep(s) t -> (x0 prediction, velocity), both [B, f, C, h, w].

    The chunk occupies frames start_frame .. start_frame + f - 1; it attends to the cached frames strictly before
    start_frame plus itself (block-causal inside the chunk when frames_per_block is given), and writes its own keys
    and values when write_cache is set (the model's rule; grad flows only where the caller enables it).
    """
    tt = frame_timesteps(t, x)
    v = model(x, tt, context, cache=cache, start_frame=start_frame, frames_per_block=frames_per_block,
              write_cache=write_cache)
    return x0_from_velocity(x, v, tt.double()), v


def write_context(model, x: torch.Tensor, t, context: torch.Tensor, cache, start_frame: int,
                  frames_per_block: int | None = None) -> None:
    """A cache-write forward (always without grad): the keys/values of x at timestep(s) t replace those frames."""
    with torch.no_grad():
        model(x, frame_timesteps(t, x), context, cache=cache, start_frame=start_frame,
              frames_per_block=frames_per_block, write_cache=True)


def fused_velocity(model, prefix: torch.Tensor, prefix_t: float, x: torch.Tensor, t: float, context: torch.Tensor,
                   cache, block: int, frames_per_block: int) -> torch.Tensor:
    """One no-grad forward over [prefix (block n-1's context at prefix_t), x (block n at t)], block-causal, writing only
    the prefix to the cache; returns block n's velocity (what its own denoise forward would give, up to rounding: the
    prefix's keys are the ones its own write forward would have cached, and block n sees them in the chunk)."""
    f = frames_per_block
    chunk = torch.cat([prefix, x], dim=1)
    tt = torch.tensor([prefix_t] * prefix.shape[1] + [t] * f, dtype=torch.float32, device=x.device)
    with torch.no_grad():
        _, v = denoise_chunk(model, chunk, tt, context, cache=cache, start_frame=(block - 1) * f,
                             frames_per_block=f, write_cache=prefix.shape[1])
    return v[:, prefix.shape[1]:]


def next_input(x: torch.Tensor, x0: torch.Tensor, v: torch.Tensor, t: float, t_next: float,
               noise: torch.Tensor | None) -> torch.Tensor:
    """The block's input at t_next after a denoise at t: x0 re-noised with fresh ``noise`` (HiAR/Self-Forcing
    default), or the deterministic Euler step x + v (sigma_next - sigma) when noise is None; x0 itself at t_next = 0."""
    if t_next == 0:
        return x0
    if noise is not None:
        return add_noise(x0, noise, t_next)
    return euler_step(x, v, t, t_next)


def recache(model, cache, runs: Sequence[tuple[int, torch.Tensor, torch.Tensor]], context: torch.Tensor,
            frames_per_block: int) -> None:
    """Rebuild the self-attention cache under ``context`` (KV recache at a prompt switch, as LongLive does).

    runs: contiguous pieces (start_frame, latents [B, f, C, h, w], per-frame timesteps [B, f]) in ascending order, the
    frames the cache should hold; each piece is one block-causal forward that attends to the pieces before it.
    """
    cache.reset()
    for start, latents, t in runs:
        write_context(model, latents, t, context, cache, start, frames_per_block)
