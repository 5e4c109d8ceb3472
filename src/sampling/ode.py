"""Euler ODE sampling of a bidirectional flow-matching model with classifier-free guidance.

The step list is `schedule.euler_grid(num_steps, shift)` (1000 -> 0). Guidance acts on the velocity:
v = v_uncond + s * (v_cond - v_uncond). `return_states_at` gives the states x at chosen grid indices (index 0 is the
initial noise, index num_steps the final sample), which ODE-pair generation stores (48 steps, shift 8, CFG 6).
"""

from __future__ import annotations

import torch

from src.flow_matching import euler_grid, euler_step


@torch.no_grad()
def sample_ode(
    model: torch.nn.Module,
    context: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    shape: tuple[int, ...] | None = None,
    generator: torch.Generator | None = None,
    uncond_context: torch.Tensor | None = None,
    num_steps: int = 48,
    shift: float = 8.0,
    guidance_scale: float = 6.0,
    return_states_at: list[int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Integrate from noise (given, or drawn with `shape` [B, F, C, H, W] from `generator`) to x0 latents.

    Guidance is used when guidance_scale != 1 and needs `uncond_context` (the negative-prompt embedding, [B or 1, L, D]).
    Returns x0, or (x0, {index: state}) when return_states_at is given.
    """
    if (noise is None) == (shape is None):
        raise ValueError("give exactly one of noise or shape")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    guided = guidance_scale != 1.0
    if guided and uncond_context is None:
        raise ValueError("guidance_scale != 1 needs uncond_context")
    wanted = sorted(set(return_states_at or []))
    if any(not 0 <= i <= num_steps for i in wanted):
        raise ValueError(f"state indices must lie in 0..{num_steps}, got {wanted}")
    device = context.device
    x = noise.to(device) if noise is not None else torch.randn(shape, generator=generator, device=device)
    batch = x.shape[0]
    if guided:
        both_contexts = torch.cat([context, uncond_context.to(context).expand(batch, -1, -1)])
    grid = euler_grid(num_steps, shift).tolist()
    states = {0: x.clone()} if 0 in wanted else {}
    for i in range(num_steps):
        t = torch.full((batch,), grid[i], device=device)
        if guided:
            v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t, t]), both_contexts).chunk(2)
            velocity = v_uncond + guidance_scale * (v_cond - v_uncond)
        else:
            velocity = model(x, t, context)
        x = euler_step(x, velocity, grid[i], grid[i + 1])
        if i + 1 in wanted:
            states[i + 1] = x.clone()
    return (x, states) if return_states_at is not None else x


@torch.no_grad()
def sample_videos(
    model: torch.nn.Module,
    text_encoder,
    codec,
    prompts: list[str],
    num_frames: int,
    latent_shape: tuple[int, int, int],
    *,
    seed: int = 0,
    negative_prompt: str = "",
    **ode_kwargs,
) -> torch.Tensor:
    """Prompts -> pixel videos [B, T, 3, H, W] in [-1, 1]; latent_shape is (C, h, w) of one latent frame."""
    device = next(model.parameters()).device
    context, _ = text_encoder.encode(prompts)
    uncond, _ = text_encoder.encode([negative_prompt])
    generator = torch.Generator(device=device).manual_seed(seed)
    latents = sample_ode(model, context.to(device), shape=(len(prompts), num_frames, *latent_shape),
                         generator=generator, uncond_context=uncond.to(device), **ode_kwargs)
    return codec.decode(latents).clamp(-1, 1)
