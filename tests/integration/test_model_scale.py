"""The DiT beyond a unit test's size: a 1.3B forward on fake tensors without an L^2 tensor, and training rollouts
(exit step with grad, rolling window) with activation checkpointing applied from outside."""

import torch

from src.distributed.parallelize import checkpoint_blocks
from src.models.wan import WanConfig, WanDiT


def test_no_quadratic_tensor_at_1_3b_shapes():
    """A 21-frame 1.3B forward (32760 tokens) on fake tensors in every mode: no tensor of L^2/2 elements or more is
    created (the dense mask alone would be L^2); the largest is the FFN activation [L, 8960]."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(o, torch.Tensor):
                    self.numel = max(self.numel, o.numel())
            return out

    tokens = 21 * 1560
    with FakeTensorMode(), torch.no_grad():
        model = WanDiT(WanConfig())
        x, t, ctx = torch.randn(1, 21, 16, 60, 104), torch.full((1, 21), 500.0), torch.randn(1, 512, 4096)
        runs = [dict(frames_per_block=3, window=21, sink=3), dict(frames_per_block=3)]
        for kwargs in runs:
            with Largest() as largest:
                model(x, t, ctx, **kwargs)
            assert largest.numel == tokens * 8960 < tokens**2 // 2
        cache = model.new_cache(window=21, sink=3)
        for start in (0, 3, 6):
            model(x[:, :6], t[:, :6], ctx, cache=cache, start_frame=start, frames_per_block=3, write_cache=3)
        with Largest() as largest:  # a fused chunk reading the cache (sinks + window)
            model(x[:, :6], t[:, :6], ctx, cache=cache, start_frame=9, frames_per_block=3, write_cache=3)
        assert largest.numel < tokens**2 // 2
        model.attention_backend = "dense"
        with Largest() as largest:
            model(x, t, ctx, frames_per_block=3)
        assert largest.numel >= tokens**2  # the reference path really builds [L, L]


def test_rollout_gradients_with_checkpointing_and_rolling_window(tiny_config):
    """Checkpointed and plain generator gradients of a step-first training rollout (exit step 1) are equal, with
    and without a rolling window: every recompute reads the cache slots its forward read."""
    from src.sampling.noise import NoiseBank
    from src.sampling.orders import SamplerConfig, sample

    torch.manual_seed(0)
    plain = WanDiT(tiny_config)
    checkpointed = checkpoint_blocks(WanDiT(tiny_config))
    checkpointed.load_state_dict(plain.state_dict())
    ctx = torch.randn(1, tiny_config.text_len, tiny_config.text_dim, generator=torch.Generator().manual_seed(1))
    for window in (None, 6):
        cfg = SamplerConfig(steps=[1000, 500], window=window)
        grads = []
        for model in (plain, checkpointed):
            model.zero_grad()
            for order in ("step_first", "block_first"):
                out = sample(model, ctx, 15, (4, 4, 6), cfg, NoiseBank(0), order=order, exit_step=1)
                out.square().mean().backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert grads[0].abs().max() > 0
        torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
