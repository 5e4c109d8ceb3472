"""Compiled flex_attention never falls back: one graph per chunk length (keys padded to the slab), an error past the
recompile limit. Compiled on CPU with a graph-counting eager backend (the CUDA path uses inductor)."""

import pytest
import torch

from src.models import attention
from src.models.attention import ChunkAttention, FlexRecompileLimit
from src.models.wan import WanConfig, WanDiT
from src.sampling.noise import NoiseBank
from src.sampling.orders import SamplerConfig
from src.sampling.wavefront import wavefront_sample

from helpers import model_inputs

LATENT = (4, 4, 4)
TOY = WanConfig(dim=32, ffn_dim=64, freq_dim=32, num_heads=2, num_layers=1, in_dim=4, out_dim=4, text_len=8,
                text_dim=16)


@pytest.fixture
def compiled_flex_on_cpu(monkeypatch):
    """Route CPU flex calls through torch.compile with a backend that records each graph's input shapes."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(tuple(tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)))
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setattr(attention, "FLEX_COMPILE_BACKENDS", {"cpu": counting_backend})
    monkeypatch.setattr(attention, "_compiled_flex", {})
    yield graphs
    torch._dynamo.reset()


@pytest.fixture
def key_lengths(monkeypatch):
    """The key lengths (unpadded) and query lengths of every multi-block attention call."""
    seen = {"keys": set(), "queries": set()}
    real_attend = ChunkAttention.attend

    def recording(self, layer, q, k, v):
        if len(self.groups) > 1:
            seen["keys"].add(self.num_keys)  # what the keys would be without padding to the slab
            seen["queries"].add(q.shape[1])
        return real_attend(self, layer, q, k, v)

    monkeypatch.setattr(ChunkAttention, "attend", recording)
    return seen


def toy_model_and_context():
    torch.manual_seed(0)
    model = WanDiT(TOY).eval()
    model.attention_backend = "flex"  # multi-block passes through flex on CPU too
    return model, torch.randn(1, TOY.text_len, TOY.text_dim, generator=torch.Generator().manual_seed(1))


def test_fused_chunks_at_13_key_lengths_compile_one_graph(compiled_flex_on_cpu, key_lengths):
    """81 frames of fused [n-1, n] chunks through a cache of the default 42 slots: 13 key lengths, one graph."""
    model, context = toy_model_and_context()
    cache = model.new_cache(window=21)  # no schedule slots: sink + 2 * window = 42
    x = torch.randn(1, 81, *LATENT, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for n in range(1, 27):
            chunk = x[:, 3 * (n - 1): 3 * (n + 1)]
            out = model(chunk, torch.full((1, 6), 500.0), context, cache=cache, start_frame=3 * (n - 1),
                        frames_per_block=3, write_cache=3)
            assert torch.isfinite(out).all()
    assert cache.capacity == 42 and len(key_lengths["keys"]) == 13  # past dynamo's default limit of 8
    assert len(compiled_flex_on_cpu) == len(key_lengths["queries"]) == 1
    assert compiled_flex_on_cpu[0][1][2] == 42 * 4  # the graph sees the whole slab: 42 frame slots of 4 tokens


def test_wavefront_at_81_frames_compiles_one_graph_per_chunk_length(compiled_flex_on_cpu, key_lengths):
    model, context = toy_model_and_context()
    cfg = SamplerConfig()  # 4 steps, blocks of 3, window 21: the wavefront's caches get 24 frame slots
    with torch.no_grad():
        out = wavefront_sample(model, context, 81, LATENT, cfg, NoiseBank(0))
    assert out.shape == (1, 81, *LATENT) and torch.isfinite(out).all()
    assert len(key_lengths["keys"]) > 1
    assert 1 <= len(compiled_flex_on_cpu) <= len(key_lengths["queries"])
    assert all(shapes[1][2] == 24 * 4 for shapes in compiled_flex_on_cpu), compiled_flex_on_cpu


def test_recompile_limit_is_an_error(compiled_flex_on_cpu, monkeypatch):
    monkeypatch.setattr(attention, "FLEX_RECOMPILE_LIMIT", 1)
    tpf = 4
    for frames in (6, 9):  # two chunk lengths: the second is one graph too many
        q = torch.randn(1, frames * tpf, 2, 16)
        visible = [[k // 3 <= f // 3 for k in range(frames)] for f in range(frames)]
        mask = attention.frame_block_mask(visible, tpf, q.device)
        if frames == 6:
            out = attention.flex(q, q, q, mask)
            assert out.shape == q.shape
        else:
            with pytest.raises(FlexRecompileLimit, match="recompile limit"):
                attention.flex(q, q, q, mask)


def test_compiled_blocks_match_eager(tiny_config):
    """src.distributed.parallelize.compile_blocks (CPU inductor): the same velocities as eager, cached and one-pass."""
    from src.distributed.parallelize import compile_blocks

    torch.manual_seed(0)
    model = WanDiT(WanConfig(**{**tiny_config.to_dict(), "num_layers": 1})).eval()
    x, t, ctx = model_inputs(frames=6, batch=1)
    with torch.no_grad():
        eager = model(x, t, ctx, frames_per_block=3, window=3)
        compile_blocks(model)
        compiled = model(x, t, ctx, frames_per_block=3, window=3)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
