import pytest
import torch

from src.distributed.parallelize import checkpoint_blocks
from src.flow_matching import x0_from_velocity
from src.models.wan import WanConfig, WanDiT
from src.perf.sampler_bench import ForwardCounter, bench_samplers
from src.sampling.noise import NoiseBank
from src.sampling.orders import SamplerConfig, forward_count, sample
from src.sampling.primitive import next_input, write_context
from src.sampling.streaming import stream
from src.worlds.toy.codec import ToyCodec

LATENT = (4, 4, 4)  # C, h, w -> 4 tokens per frame with patch 2x2
TPF = 4


@pytest.fixture
def ctx(tiny_config):
    return torch.randn(1, tiny_config.text_len, tiny_config.text_dim, generator=torch.Generator().manual_seed(1))


class Recorder(ForwardCounter):
    """Counts forwards and notes, per call, grad mode, cache write and the cache size afterwards."""

    def __init__(self, model):
        super().__init__(model)
        self.calls = []
        self.cache = None

    def new_cache(self, **kwargs):
        self.cache = super().new_cache(**kwargs)
        return self.cache

    def __call__(self, x, t, context, **kw):
        out = super().__call__(x, t, context, **kw)
        self.calls.append({"grad": torch.is_grad_enabled(), "write": bool(kw.get("write_cache")),
                           "start": kw.get("start_frame", 0), "frames": x.shape[1],
                           "cached": kw["cache"].num_frames if kw.get("cache") is not None else None})
        return out


def run(model, ctx, frames, order, bank_seed=0, **cfg):
    cfg.setdefault("window", None)
    return sample(model, ctx, frames, LATENT, SamplerConfig(**cfg), NoiseBank(bank_seed), order=order)


def test_orders_agree_with_one_block_or_one_step(tiny_model, ctx):
    three = dict(steps=[1000, 750, 500])
    ref = run(tiny_model, ctx, 3, "block_first", **three)
    assert torch.equal(ref, run(tiny_model, ctx, 3, "step_first", **three))
    assert torch.equal(ref, run(tiny_model, ctx, 3, "hybrid", **three))
    euler = dict(three, renoise=False)
    assert torch.equal(run(tiny_model, ctx, 3, "block_first", **euler), run(tiny_model, ctx, 3, "step_first", **euler))
    one = dict(steps=[1000])
    assert torch.equal(run(tiny_model, ctx, 9, "block_first", **one), run(tiny_model, ctx, 9, "step_first", **one))
    two = dict(steps=[1000, 500])
    step_first = run(tiny_model, ctx, 9, "step_first", **two)
    # hybrid with k = 1 is step-first: its first step already sees earlier blocks at t_1
    assert torch.equal(run(tiny_model, ctx, 9, "hybrid", hybrid_steps=1, **two), step_first)
    assert not torch.allclose(run(tiny_model, ctx, 9, "block_first", **two), step_first)


@pytest.mark.parametrize(
    "order,options,expected",
    [  # N = 3 blocks, S = 3 steps
        ("block_first", {}, 3 * (3 + 1) - 1),
        ("step_first", {}, 3 * (2 * 3 - 1)),
        ("step_first", {"context_level": "clean"}, 3 * (2 * 3 - 1)),
        ("step_first", {"context_level": "current"}, 3 * 3),
        ("hybrid", {"hybrid_steps": 2}, 3 * 2 + 2 + 1 * 5),
    ],
)
def test_forward_and_token_counts(tiny_model, ctx, order, options, expected):
    cfg = SamplerConfig(steps=[1000, 750, 500], window=None, **options)
    counter = ForwardCounter(tiny_model)
    out = sample(counter, ctx, 9, LATENT, cfg, NoiseBank(0), order=order)
    assert out.shape == (1, 9, *LATENT)
    assert counter.forwards == expected == forward_count(cfg.with_order(order), 3)
    assert counter.tokens == expected * 3 * TPF


def test_current_context_is_one_block_causal_pass_per_step(tiny_model, ctx):
    # 81 frames, rolling window 21 + sink 3: the cached sampler must see exactly what the masked single pass sees
    cfg = SamplerConfig(steps=[1000, 500], window=21, sink=3, context_level="current")
    rec = Recorder(tiny_model)
    out = sample(rec, ctx, 81, LATENT, cfg, NoiseBank(5), order="step_first")
    assert rec.forwards == 2 * 27
    sizes = [c["cached"] for c in rec.calls]
    # bounded by window + sink; the slab holds what one forward needs (schedule_slots), so a chunk that does not fit
    # keeps only the frames it may still see (3 sinks + 18)
    assert max(sizes) == 24 and rec.cache.capacity == 24 and sizes[27 - 1] == 21
    bank, ts = NoiseBank(5), cfg.timesteps
    x = torch.cat([bank.noise("init", 0, n, (1, 3, *LATENT)) for n in range(27)], 1)
    with torch.no_grad():
        for j, t in enumerate(ts):
            v = tiny_model(x, torch.full((1, 81), t), ctx, frames_per_block=3, window=21, sink=3)
            x0 = x0_from_velocity(x, v, torch.full((1, 81), t, dtype=torch.float32).double())
            if j + 1 < len(ts):
                noise = torch.cat([bank.noise("renoise", j, n, (1, 3, *LATENT)) for n in range(27)], 1)
                x = next_input(x, x0, v, t, ts[j + 1], noise)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)


def test_block_first_rolling_window_matches_masked_pass(tiny_model, ctx):
    cfg = SamplerConfig(steps=[1000], window=21, sink=3)
    rec = Recorder(tiny_model)
    out = sample(rec, ctx, 81, LATENT, cfg, NoiseBank(2), order="block_first")
    assert max(c["cached"] for c in rec.calls) == 24
    # the last block denoised from its noise given the clean x0 of all earlier blocks, in one masked pass
    x = torch.cat([out[:, :78], NoiseBank(2).noise("init", 0, 26, (1, 3, *LATENT))], 1)
    t = torch.cat([torch.zeros(1, 78), torch.full((1, 3), 1000.0)], 1)
    with torch.no_grad():
        v = tiny_model(x, t, ctx, frames_per_block=3, window=21, sink=3)
    torch.testing.assert_close(out[:, 78:], x0_from_velocity(x, v, t.double())[:, 78:], atol=1e-5, rtol=1e-5)


def test_noise_bank_is_addressed_and_shared():
    a, b = NoiseBank(7), NoiseBank(7)
    first = a.noise("renoise", 2, 5, (1, 3, 4))
    b.noise("init", 0, 0, (2, 2))
    assert torch.equal(first, b.noise("renoise", 2, 5, (1, 3, 4)))
    # another address or seed: another draw (differences of order 1, not rounding)
    assert (first - a.noise("renoise", 2, 4, (1, 3, 4))).abs().max() > 0.5
    assert (first - NoiseBank(8).noise("renoise", 2, 5, (1, 3, 4))).abs().max() > 0.5
    with pytest.raises(ValueError, match="unknown noise kind"):
        a.noise("bogus", 0, 0, (1,))


class LoggingBank(NoiseBank):
    def __init__(self, seed):
        super().__init__(seed)
        self.addresses = []

    def noise(self, kind, step, block, shape, device=None, dtype=torch.float32):
        self.addresses.append((kind, step, block))
        return super().noise(kind, step, block, shape, device, dtype)


def test_orders_consume_the_same_noise_addresses(tiny_model, ctx):
    cfg = SamplerConfig(steps=[1000, 500], window=None, context_noise=20.0)
    banks = {order: LoggingBank(3) for order in ("block_first", "step_first")}
    outs = {order: sample(tiny_model, ctx, 9, LATENT, cfg, bank, order=order) for order, bank in banks.items()}
    expected = ({("init", 0, n) for n in range(3)} | {("renoise", 0, n) for n in range(3)}
                | {("context", 1, n) for n in range(2)})
    for bank in banks.values():
        assert set(bank.addresses) == expected and len(bank.addresses) == len(expected)
    assert torch.equal(outs["step_first"], sample(tiny_model, ctx, 9, LATENT, cfg, NoiseBank(3), order="step_first"))
    assert (outs["step_first"] - sample(tiny_model, ctx, 9, LATENT, cfg, NoiseBank(4))).abs().max() > 0.1
    euler = LoggingBank(3)
    sample(tiny_model, ctx, 9, LATENT, SamplerConfig(steps=[1000, 500], window=None, renoise=False), euler)
    assert {kind for kind, _, _ in euler.addresses} == {"init"}


class Snapshot(Recorder):
    """Keeps the cache as the first denoise forward of block 3 (frames 9..11) reads it (right after the recache)."""

    def __call__(self, x, t, context, **kw):
        if kw.get("start_frame") == 9 and not kw.get("write_cache") and not hasattr(self, "frames"):
            self.frames = list(kw["cache"].frames)
            cache = kw["cache"]
            self.keys = [cache.held(layer)[0].clone() for layer in range(cache.num_layers)]
        return super().__call__(x, t, context, **kw)


def test_prompt_switch_recaches_window_under_new_prompt(tiny_model, ctx):
    other = torch.randn_like(ctx)
    cfg = SamplerConfig(steps=[1000, 500], window=6)
    rec = Snapshot(tiny_model)
    out = sample(rec, {0: ctx, 3: other}, 12, LATENT, cfg, NoiseBank(0), order="block_first")
    assert rec.forwards == forward_count(cfg.with_order("block_first"), 4) + 1  # one recache forward
    assert rec.frames == [3, 4, 5, 6, 7, 8]
    fresh = tiny_model.new_cache(window=6)
    for n in (1, 2):  # a fresh block-by-block pass over those frames (clean x0 at t = 0) under the new prompt
        write_context(tiny_model, out[:, 3 * n : 3 * n + 3], 0.0, other, fresh, 3 * n)
    for got, want in zip(rec.keys, [fresh.held(layer)[0] for layer in range(fresh.num_layers)]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # step-first: blocks before the switch are untouched, later ones change; one recache per step
    counter = ForwardCounter(tiny_model)
    switched = sample(counter, {0: ctx, 2: other}, 12, LATENT, cfg, NoiseBank(0))
    plain = sample(tiny_model, ctx, 12, LATENT, cfg, NoiseBank(0))
    assert counter.forwards == forward_count(cfg.with_order("step_first"), 4) + 2
    assert torch.equal(switched[:, :6], plain[:, :6]) and not torch.allclose(switched[:, 6:], plain[:, 6:])


@pytest.mark.parametrize("order", ["step_first", "block_first"])
def test_exit_step_rollout_grad_only_through_exit_forwards(tiny_config, ctx, order):
    torch.manual_seed(0)
    model = checkpoint_blocks(WanDiT(tiny_config))  # which refuses cache writes with grad
    rec = Recorder(model)
    cfg = SamplerConfig(steps=[1000, 750, 500], window=None)
    out = sample(rec, ctx, 9, LATENT, cfg, NoiseBank(0), order=order, exit_step=1)
    assert out.shape == (1, 9, *LATENT) and out.requires_grad
    grad_calls = [c for c in rec.calls if c["grad"]]
    assert len(grad_calls) == 3 and not any(c["write"] for c in grad_calls)
    assert rec.forwards == forward_count(cfg.with_order(order), 3, exit_step=1)
    out.square().mean().backward()
    assert model.head.head.weight.grad is not None
    with torch.no_grad():
        full = sample(model, ctx, 9, LATENT, cfg, NoiseBank(0), order=order, exit_step=2)
        assert torch.equal(full, sample(model, ctx, 9, LATENT, cfg, NoiseBank(0), order=order))
    if order == "block_first":  # each block stops at j*: the same as sampling with the first j* + 1 steps
        short = sample(model, ctx, 9, LATENT, SamplerConfig(steps=[1000, 750], window=None), NoiseBank(0),
                       order=order)
        torch.testing.assert_close(out.detach(), short)


def test_streaming_yields_final_blocks_in_order():
    cfg_model = WanConfig(dim=64, ffn_dim=128, freq_dim=32, num_heads=4, num_layers=1, in_dim=12, out_dim=12,
                          text_len=8, text_dim=16)
    torch.manual_seed(0)
    model = ForwardCounter(WanDiT(cfg_model).eval())
    context = torch.randn(1, 8, 16)
    cfg = SamplerConfig(steps=[1000, 500], window=None)
    for order, first_after in (("block_first", 2), ("step_first", (2 - 1) * (2 * 3 - 1) + 1)):
        model.forwards = 0
        blocks = stream(model, context, 9, (12, 4, 4), cfg, NoiseBank(0), order=order, codec=ToyCodec(2))
        first = next(blocks)
        assert first.index == 0 and model.forwards == first_after
        rest = list(blocks)
        assert [b.index for b in rest] == [1, 2] and rest[-1].pixels.shape == (1, 3, 3, 8, 8)
        whole = torch.cat([first.latents] + [b.latents for b in rest], 1)
        assert torch.equal(whole, sample(model, context, 9, (12, 4, 4), cfg, NoiseBank(0), order=order))


def test_bad_input_errors(tiny_model, ctx):
    with pytest.raises(ValueError, match="not a positive multiple of frames_per_block"):
        run(tiny_model, ctx, 10, "step_first")
    with pytest.raises(ValueError, match="exit_step"):
        sample(tiny_model, ctx, 3, LATENT, SamplerConfig(), NoiseBank(0), exit_step=4)
    with pytest.raises(ValueError, match="window"):
        SamplerConfig(window=20)
    with pytest.raises(ValueError, match="context_level"):
        SamplerConfig(context_level="t_j")
    with pytest.raises(ValueError, match="unknown sampler order"):
        run(tiny_model, ctx, 3, "frame_first")
    with pytest.raises(ValueError, match="start at block 0"):
        run(tiny_model, {1: ctx}, 6, "step_first")
    with pytest.raises(ValueError, match="hybrid_steps"):
        run(tiny_model, ctx, 3, "hybrid", hybrid_steps=5)


def test_bench_samplers_reports_each_order(tiny_model):
    results = bench_samplers(tiny_model, LATENT, num_frames=6, cfg=SamplerConfig(steps=[1000, 500]))
    assert set(results) == {"block_first", "step_first", "step_first_tc_current", "hybrid_k2"}
    for r in results.values():
        assert r["forwards"] == r["expected_forwards"] and r["frames_per_s"] > 0
        assert 0 < r["first_block_latency_s"] <= r["total_s"]


