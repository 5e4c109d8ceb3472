"""Sampler benchmarks (not timed tests): frames/s, first-block latency and counted forwards of each order.

``bench_samplers`` is called by ``make bench`` (src/perf/cpu.py) for the toy preset and a larger one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch

from src.models.wan import WanConfig, WanDiT
from src.sampling.noise import NoiseBank
from src.sampling.orders import SamplerConfig, forward_count
from src.sampling.streaming import stream

# name -> (order, SamplerConfig overrides)
DEFAULT_VARIANTS = {
    "block_first": ("block_first", {}),
    "step_first": ("step_first", {}),
    "step_first_tc_current": ("step_first", {"context_level": "current"}),
    "hybrid_k2": ("hybrid", {"hybrid_steps": 2}),
}


class ForwardCounter:
    """Wraps a WanDiT for the samplers: counts forwards, and tokens per batch element, then calls the model."""

    def __init__(self, model: WanDiT):
        self.model = model
        self.forwards = 0
        self.tokens = 0

    def new_cache(self, **kwargs):
        return self.model.new_cache(**kwargs)

    def __call__(self, x, t, context, **kwargs):
        self.forwards += 1
        self.tokens += x.shape[1] * self.model.tokens_per_frame(x.shape[3], x.shape[4])
        return self.model(x, t, context, **kwargs)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_samplers(model: WanDiT | WanConfig, latent_shape: Sequence[int], num_frames: int = 21, *,
                   cfg: SamplerConfig | None = None, variants: Mapping[str, tuple[str, dict]] | None = None,
                   seed: int = 0, device: str | torch.device | None = None) -> dict:
    """Time one generation of num_frames latent frames (batch 1, random text) per sampler variant.

    model: a WanDiT, or a WanConfig for a randomly initialised one. latent_shape: (C, h, w). Returns
    {variant: {order, context_level, num_frames, frames_per_s (latent frames), first_block_latency_s, total_s,
    forwards, expected_forwards, tokens}}. One warm-up forward precedes the timings.
    """
    if isinstance(model, WanConfig):
        torch.manual_seed(seed)
        model = WanDiT(model).eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device)
    cfg = cfg or SamplerConfig()
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(1, model.cfg.text_len, model.cfg.text_dim, generator=generator).to(device)
    with torch.no_grad():  # warm-up: one cached block forward
        model(torch.zeros(1, cfg.frames_per_block, *latent_shape, device=device), 1000.0, context,
              cache=model.new_cache(), write_cache=True)
    results = {}
    for name, (order, overrides) in (variants or DEFAULT_VARIANTS).items():
        variant_cfg = replace(cfg, **overrides)
        counter = ForwardCounter(model)
        _sync(device)
        start = time.perf_counter()
        first = None
        for _ in stream(counter, context, num_frames, latent_shape, variant_cfg, NoiseBank(seed), order=order):
            if first is None:
                _sync(device)
                first = time.perf_counter() - start
        _sync(device)
        total = time.perf_counter() - start
        results[name] = {
            "order": order,
            "context_level": "clean" if order == "block_first" else variant_cfg.context_level,
            "num_frames": num_frames,
            "frames_per_s": num_frames / total,
            "first_block_latency_s": first,
            "total_s": total,
            "forwards": counter.forwards,
            "expected_forwards": forward_count(variant_cfg.with_order(order),
                                                num_frames // variant_cfg.frames_per_block),
            "tokens": counter.tokens,
        }
    return results
