"""Fused cache writes (SamplerConfig.fuse_writes): the same video as the unfused sampler, in fewer, larger forwards."""

import pytest
import torch

from src.perf.sampler_bench import ForwardCounter
from src.sampling.noise import NoiseBank
from src.sampling.orders import SamplerConfig, forward_count, sample

LATENT = (4, 4, 4)
# float32, one thread: a fused forward computes block n's rows in a chunk twice as long, so its matmuls may round
# differently (~1e-7 relative per op); through 3 steps of a 2-layer model that stays far below 1e-5.
TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def ctx(tiny_config):
    return torch.randn(1, tiny_config.text_len, tiny_config.text_dim, generator=torch.Generator().manual_seed(1))


def run(model, ctx, frames, fuse, exit_step=None, context=None, **options):
    cfg = SamplerConfig(steps=[1000, 750, 500], fuse_writes=fuse, **options)
    counter = ForwardCounter(model)
    grad = torch.enable_grad() if exit_step is not None else torch.no_grad()
    with grad:
        out = sample(counter, ctx if context is None else context, frames, LATENT, cfg, NoiseBank(3),
                     exit_step=exit_step)
    return out, counter.forwards, cfg


@pytest.mark.parametrize("options", [
    {"order": "block_first"},
    {"order": "step_first"},
    {"order": "step_first", "context_level": "clean", "context_noise": 20.0},
    {"order": "step_first", "context_level": "current"},
    {"order": "hybrid", "hybrid_steps": 2},
    {"order": "block_first", "window": 6, "sink": 3},  # the rolling window and sinks over 5 blocks
    {"order": "step_first", "window": 6},
])
def test_fused_equals_unfused_in_fewer_forwards(tiny_model, ctx, options):
    options.setdefault("window", None)
    blocks = 5
    ref, ref_forwards, cfg = run(tiny_model, ctx, 3 * blocks, False, **options)
    out, forwards, fused_cfg = run(tiny_model, ctx, 3 * blocks, True, **options)
    assert (out - ref).abs().max() < TOLERANCE
    assert ref_forwards == forward_count(cfg, blocks)
    assert forwards == forward_count(fused_cfg, blocks)
    n, s = blocks, cfg.num_steps
    expected = {"block_first": n * s, "step_first": s * n, "hybrid": n * 2 + 1 * n}[cfg.order]
    assert forwards == expected  # every write rode in a denoise forward
    saved = 0 if cfg.order == "step_first" and cfg.context_level == "current" else ref_forwards - expected
    assert ref_forwards - forwards == saved


@pytest.mark.parametrize("order,exit_step", [("block_first", 1), ("block_first", 0), ("step_first", 1),
                                             ("hybrid", 2), ("hybrid", 0)])
def test_training_rollout_writes_beside_grad_forwards(tiny_model, ctx, order, exit_step):
    """A forward with grad never writes the cache: the writes of a grad cell's predecessor run on their own."""
    ref, ref_forwards, cfg = run(tiny_model, ctx, 9, False, exit_step=exit_step, order=order, window=None)
    out, forwards, fused_cfg = run(tiny_model, ctx, 9, True, exit_step=exit_step, order=order, window=None)
    assert out.requires_grad and (out - ref).abs().max() < TOLERANCE
    assert ref_forwards == forward_count(cfg, 3, exit_step=exit_step)
    assert forwards == forward_count(fused_cfg, 3, exit_step=exit_step)
    out.float().pow(2).mean().backward()  # the grad path is intact
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_model.parameters())


def test_prompt_switch_with_fused_writes(tiny_model, ctx):
    other = torch.randn(ctx.shape, generator=torch.Generator().manual_seed(2))
    schedule = {0: ctx, 2: other}
    for order in ("block_first", "step_first"):
        ref, _, _ = run(tiny_model, ctx, 12, False, context=schedule, order=order, window=6)
        out, _, _ = run(tiny_model, ctx, 12, True, context=schedule, order=order, window=6)
        assert (out - ref).abs().max() < TOLERANCE


def test_block_first_at_81_frames_needs_108_forwards(tiny_model, ctx):
    cfg = SamplerConfig(order="block_first", fuse_writes=True)  # 4 steps, window 21
    assert forward_count(cfg, 27) == 108 and forward_count(SamplerConfig(order="block_first"), 27) == 134
    assert forward_count(cfg.with_order("step_first"), 27) == 108
    assert forward_count(SamplerConfig(order="step_first"), 27) == 4 * 53
    counter = ForwardCounter(tiny_model)
    with torch.no_grad():
        sample(counter, ctx, 81, LATENT, cfg, NoiseBank(0))
    assert counter.forwards == 108
