"""The DiT: three attention modes agree, presets match the published key lists, diffusers agrees numerically."""

from pathlib import Path

import pytest
import torch

from src.checkpoints import wan_to_diffusers
from src.distributed.parallelize import checkpoint_blocks
from src.models.wan import WanConfig, WanDiT, count_parameters, rope_axis_dims

from helpers import ATTENTION_MODES
from helpers import model_inputs as _inputs

FIXTURES = Path(__file__).parents[1] / "fixtures"


def _cached_blocks(model, x, t, ctx, fpb, cache):
    outs = []
    for start in range(0, x.shape[1], fpb):
        sl = slice(start, start + fpb)
        outs.append(model(x[:, sl], t[:, sl], ctx, cache=cache, start_frame=start, write_cache=True))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("window,sink", [(None, 0), (6, 0), (6, 3), (9, 2)])
@torch.no_grad()
def test_cached_equals_block_causal(tiny_model, window, sink):
    x, t, ctx = _inputs()
    one_pass = tiny_model(x, t, ctx, frames_per_block=3, window=window, sink=sink)
    cache = tiny_model.new_cache(window=window, sink=sink)
    cached = _cached_blocks(tiny_model, x, t, ctx, 3, cache)
    assert (cached - one_pass).abs().max() <= 1e-5
    assert one_pass.abs().mean() > 1e-2  # a real signal, not zeros
    if window is not None:
        assert cache.num_frames <= window + sink
        assert cache.frames[:sink] == list(range(sink))


@torch.no_grad()
def test_window_changes_what_is_seen(tiny_model):
    x, t, ctx = _inputs()
    full = tiny_model(x, t, ctx, frames_per_block=3)
    windowed = tiny_model(x, t, ctx, frames_per_block=3, window=6)
    assert torch.allclose(full[:, :6], windowed[:, :6], atol=1e-6)  # first two blocks see the same frames
    assert (full[:, 6:] - windowed[:, 6:]).abs().max() > 1e-4


@torch.no_grad()
def test_overwriting_a_block_uses_the_new_values(tiny_model):
    x, t, ctx = _inputs(frames=6)
    cache = tiny_model.new_cache()
    tiny_model(x[:, :3], t[:, :3], ctx, cache=cache, start_frame=0, write_cache=True)
    x_new = torch.randn_like(x[:, :3])
    tiny_model(x_new, t[:, :3], ctx, cache=cache, start_frame=0, write_cache=True)  # same slots, new content
    assert cache.frames == [0, 1, 2]
    via_cache = tiny_model(x[:, 3:], t[:, 3:], ctx, cache=cache, start_frame=3)
    reference = tiny_model(torch.cat([x_new, x[:, 3:]], 1), t, ctx, frames_per_block=3)[:, 3:]
    assert (via_cache - reference).abs().max() <= 1e-5


@torch.no_grad()
def test_partial_write_and_block_causal_chunk(tiny_model):
    """A 6-frame chunk, block-causal inside, writing only its first 3 frames (the fused pipeline call)."""
    x, t, ctx = _inputs(frames=9)
    reference = tiny_model(x, t, ctx, frames_per_block=3)
    cache = tiny_model.new_cache()
    tiny_model(x[:, :3], t[:, :3], ctx, cache=cache, start_frame=0, write_cache=True)
    fused = tiny_model(x[:, 3:9], t[:, 3:9], ctx, cache=cache, start_frame=3, write_cache=3, frames_per_block=3)
    assert (fused - reference[:, 3:9]).abs().max() <= 1e-5
    assert cache.frames == [0, 1, 2, 3, 4, 5]


@torch.no_grad()
def test_bidirectional_equals_one_block(tiny_model):
    x, t, ctx = _inputs()
    assert torch.equal(tiny_model(x, t, ctx), tiny_model(x, t, ctx, frames_per_block=12))


@torch.no_grad()
def test_per_frame_timesteps_get_their_own_modulation(tiny_model):
    x, _, ctx = _inputs(frames=3)
    scalar = tiny_model(x, torch.full((2,), 500.0), ctx)
    per_frame = tiny_model(x, torch.full((2, 3), 500.0), ctx)
    assert torch.equal(scalar, per_frame)
    mixed = tiny_model(x, torch.tensor([[500.0, 500.0, 100.0]] * 2), ctx)
    assert not torch.allclose(mixed, scalar)


@torch.no_grad()
def test_positions_beyond_the_official_table(tiny_model):
    x, t, ctx = _inputs(frames=3, batch=1)
    cache = tiny_model.new_cache(window=3)
    out = tiny_model(x, t, ctx, cache=cache, start_frame=5000, write_cache=True)
    assert torch.isfinite(out).all() and cache.frames == [5000, 5001, 5002]


def test_gradient_checkpointing_gives_the_same_gradients(tiny_config):
    """Activation checkpointing applied from outside (src.distributed.parallelize.checkpoint_blocks)."""
    torch.manual_seed(0)
    model = WanDiT(tiny_config)
    x, t, ctx = _inputs(frames=6)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        if flag:
            checkpoint_blocks(model)
        model(x, t, ctx, frames_per_block=3).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_bad_inputs_give_clear_errors(tiny_model):
    x, t, ctx = _inputs(frames=3)
    with pytest.raises(ValueError, match="timesteps"):
        tiny_model(x, torch.zeros(2, 5), ctx)
    with pytest.raises(ValueError, match="divisible"):
        tiny_model(torch.randn(2, 3, 4, 5, 6), t, ctx)


def _reference_keys(name):
    lines = (FIXTURES / f"wan2.1_t2v_{name}_keys.tsv").read_text().splitlines()
    total = int(lines[0].split("=")[1])
    keys = {}
    for line in lines[1:]:
        key, shape, dtype = line.split("\t")
        keys[key] = tuple(int(s) for s in shape.split(","))
        assert dtype == "float32"
    return keys, total


@pytest.mark.parametrize(
    "name,config",
    [("1.3b", WanConfig()), ("14b", WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40))],
)
def test_presets_match_the_published_key_lists(name, config):
    with torch.device("meta"):
        model = WanDiT(config)
    keys, total = _reference_keys(name)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys
    assert count_parameters(model) == total


def test_hydra_presets_are_the_published_configs():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    conf = Path(__file__).parents[2] / "conf"
    with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
        for preset, (dim, layers) in {"wan2.1-t2v-1.3b": (1536, 30), "wan2.1-t2v-14b": (5120, 40)}.items():
            cfg = instantiate(compose(config_name=f"model/{preset}").model)
            assert (cfg.dim, cfg.num_layers, cfg.head_dim, cfg.patch_size) == (dim, layers, 128, (1, 2, 2))


def test_wan_release_config_json_loads(tmp_path):
    release = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "t2v", "dim": 1536,
               "eps": 1e-06, "ffn_dim": 8960, "freq_dim": 256, "in_dim": 16, "num_heads": 12, "num_layers": 30,
               "out_dim": 16, "text_len": 512}
    (tmp_path / "config.json").write_text(__import__("json").dumps(release))
    assert WanConfig.from_json(tmp_path / "config.json") == WanConfig()


def test_rope_split_matches_wan():
    assert rope_axis_dims(128) == (44, 42, 42)


@torch.no_grad()
def test_numerically_equal_to_diffusers_wan_transformer(tiny_model, tiny_config):
    """An independent implementation of the published architecture (diffusers) gives the same velocity."""
    from diffusers import WanTransformer3DModel

    c = tiny_config
    reference = WanTransformer3DModel(
        patch_size=c.patch_size, num_attention_heads=c.num_heads, attention_head_dim=c.head_dim, in_channels=c.in_dim,
        out_channels=c.out_dim, text_dim=c.text_dim, freq_dim=c.freq_dim, ffn_dim=c.ffn_dim, num_layers=c.num_layers,
    ).eval()
    reference.load_state_dict(wan_to_diffusers(tiny_model.state_dict()), strict=True)
    x, _, _ = _inputs(frames=5, batch=1)
    ctx = torch.randn(1, 8, 16)
    t = torch.tensor([937.5])
    ours = tiny_model(x, t, ctx)
    theirs = reference(x.permute(0, 2, 1, 3, 4), t, ctx, return_dict=False)[0].permute(0, 2, 1, 3, 4)
    assert (ours - theirs).abs().max() <= 1e-5


# --------------------------------------------------------------------------------------------- attention paths


def _with_backend(model, backend):
    model.attention_backend = backend
    return model


MODES = ATTENTION_MODES


@pytest.mark.parametrize("backend", ["auto", "flex"])
@pytest.mark.parametrize("fpb,window,sink", MODES)
@torch.no_grad()
def test_one_pass_equals_dense_reference(tiny_model, backend, fpb, window, sink):
    x, t, ctx = _inputs()
    reference = _with_backend(tiny_model, "dense")(x, t, ctx, frames_per_block=fpb, window=window, sink=sink)
    out = _with_backend(tiny_model, backend)(x, t, ctx, frames_per_block=fpb, window=window, sink=sink)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "flex"])
@pytest.mark.parametrize("window,sink", [(None, 0), (6, 0), (6, 3), (9, 3)])
def test_cached_and_fused_equal_dense_reference(tiny_model, backend, window, sink):
    """Block by block through the in-place cache (no grad) and the copy path (grad), and the fused chunk
    [block n-1 rewritten, block n] with a partial write: all equal the dense one-pass reference."""
    x, t, ctx = _inputs(frames=18)
    with torch.no_grad():
        reference = _with_backend(tiny_model, "dense")(x, t, ctx, frames_per_block=3, window=window, sink=sink)
    model = _with_backend(tiny_model, backend)
    for grad in (False, True):
        cache = model.new_cache(window=window, sink=sink)
        outs = []
        for start in range(0, 18, 3):
            with torch.set_grad_enabled(grad):
                outs.append(model(x[:, start:start + 3], t[:, start:start + 3], ctx, cache=cache, start_frame=start))
            with torch.no_grad():
                model(x[:, start:start + 3], t[:, start:start + 3], ctx, cache=cache, start_frame=start,
                      write_cache=True)
        torch.testing.assert_close(torch.cat(outs, 1).detach(), reference, atol=1e-5, rtol=1e-5)
        assert cache.num_frames <= (window or 18) + sink
    cache = model.new_cache(window=window, sink=sink)
    with torch.no_grad():
        model(x[:, :3], t[:, :3], ctx, cache=cache, start_frame=0, write_cache=True)
        for start in range(3, 18, 3):  # chunk [start-3, start+3): rewrites block start-3, denoises block start
            fused = model(x[:, start - 3:start + 3], t[:, start - 3:start + 3], ctx, cache=cache,
                          start_frame=start - 3, frames_per_block=3, write_cache=3)
            torch.testing.assert_close(fused, reference[:, start - 3:start + 3], atol=1e-5, rtol=1e-5)


def test_steady_state_cached_forwards_need_no_mask_and_no_copy(tiny_model):
    """With a rolling window, each block's visible frames are at most two contiguous slab ranges (sinks, window;
    one right after a compaction): unmasked calls, the chunk written in place, one slab allocation."""
    from src.models.attention import ChunkAttention

    x, t, ctx = _inputs(frames=30, batch=1)
    cache = tiny_model.new_cache(window=6, sink=3)
    slabs = set()
    with torch.no_grad():
        for start in range(0, 30, 3):
            plan = ChunkAttention(cache, start, 3, 6, None, 6, 3, 3)
            assert plan.mode == "in_place" and len(plan.groups) == 1
            assert len(plan.groups[0][2]) <= 2  # sinks + window: at most two contiguous slab ranges
            tiny_model(x[:, start:start + 3], t[:, start:start + 3], ctx, cache=cache, start_frame=start,
                       write_cache=True)
            slabs.add(cache.keys[0].data_ptr())
    assert len(slabs) == 1 and cache.capacity == 3 + 2 * 6
    assert cache.frames == [0, 1, 2, 24, 25, 26, 27, 28, 29]


def test_checkpointed_recompute_refuses_an_overwritten_cache(tiny_config):
    from src.models.kv_cache import CacheChanged

    torch.manual_seed(0)
    model = checkpoint_blocks(WanDiT(tiny_config))
    x, t, ctx = _inputs(frames=6, batch=1)
    cache = model.new_cache(window=6)
    with torch.no_grad():
        model(x[:, :3], t[:, :3], ctx, cache=cache, start_frame=0, write_cache=True)
    out = model(x[:, 3:], t[:, 3:], ctx, cache=cache, start_frame=3)  # reads frames 0..2 with grad
    with torch.no_grad():
        model(torch.randn_like(x[:, :3]), t[:, :3], ctx, cache=cache, start_frame=0, write_cache=True)
    with pytest.raises(CacheChanged, match="checkpointed"):
        out.square().mean().backward()


def test_rope_tables_built_in_inference_or_fake_mode_serve_a_later_backward(tiny_model):
    """The RoPE table cache never hands a later training forward an inference-mode tensor (Lightning's predict, e.g.
    the ODE pairs, runs under it) or a fake one (the estimator)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from src.models.wan import rope_tables

    x = torch.randn(1, 3, 4, 4, 4)
    t = torch.full((1, 3), 500.0)
    ctx = torch.randn(1, tiny_model.cfg.text_len, tiny_model.cfg.text_dim)
    with torch.inference_mode():
        tiny_model(x, t, ctx)
    tiny_model(x, t, ctx).square().mean().backward()
    assert all(p.grad is not None for p in tiny_model.blocks[0].self_attn.q.parameters())

    geometry = (16, 5, 7, 3, 2)  # one no other test uses
    with FakeTensorMode():
        assert isinstance(rope_tables(*geometry, "cpu"), FakeTensor)
    real = rope_tables(*geometry, "cpu")
    assert not isinstance(real, FakeTensor) and torch.isfinite(real).all()
