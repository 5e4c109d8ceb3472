"""Continuation (issue 29): given frames written into the KV cache by the sampler's own clean-context write, every order
continuing from the next block, and the alignment rules of src/continuation.py."""

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from src.continuation import align, encode_context, fit_size, load_frames
from src.models.wan import WanConfig, WanDiT
from src.sampling.noise import NoiseBank
from src.sampling.orders import SamplerConfig, sample
from src.sampling.streaming import stream
from src.worlds.toy.codec import ToyCodec

LATENT = (4, 4, 4)
F = 3  # frames per block


@pytest.fixture
def ctx(tiny_config):
    return torch.randn(1, tiny_config.text_len, tiny_config.text_dim, generator=torch.Generator().manual_seed(1))


class CacheProbe:
    """Wraps a WanDiT: at every forward of block `block` (its denoise forwards and its own write, which read the cache
    as it stands before that block) copies the keys/values, every layer, of the cached frames the block may see."""

    def __init__(self, model, block: int, window: int | None):
        self.model, self.start, self.seen = model, block * F, []
        self.first_visible = 0 if window is None else max(0, self.start - (window - F))

    def new_cache(self, **kwargs):
        return self.model.new_cache(**kwargs)

    def __call__(self, x, t, context, **kw):
        cache = kw.get("cache")
        if kw.get("start_frame") == self.start and cache.num_frames:
            tpf = cache.tpf
            visible = [i for i, f in enumerate(cache.frames) if f >= self.first_visible]
            layers = [torch.cat([kv[:, i * tpf:(i + 1) * tpf] for i in visible for kv in cache.held(layer)], 1)
                      for layer in range(self.model.cfg.num_layers)]
            self.seen.append(([cache.frames[i] for i in visible], layers))
        return self.model(x, t, context, **kw)


def cfg(**kw):
    return SamplerConfig(**{"window": None, "steps": [1000, 750, 500, 250], **kw})


@pytest.mark.parametrize("options", [{}, {"window": 6}, {"context_noise": 50.0}])
def test_block_first_continues_its_own_video_exactly(tiny_model, ctx, options):
    """Given the first m blocks block-first made, block-first makes the same remaining blocks, bit for bit: the given
    frames enter the cache exactly as the sampler's own final blocks do (the same clean-context write, the same noise
    addresses)."""
    c = cfg(order="block_first", **options)
    with torch.no_grad():
        full = sample(tiny_model, ctx, 12, LATENT, c, NoiseBank(0))
        for m in (1, 2):
            continued = sample(tiny_model, ctx, 12, LATENT, c, NoiseBank(0), prefix=full[:, :m * F])
            assert torch.equal(continued, full)


@pytest.mark.parametrize("options", [
    {"order": "step_first"}, {"order": "step_first", "context_level": "clean"},
    {"order": "step_first", "context_level": "current"}, {"order": "hybrid", "hybrid_steps": 2},
    {"order": "step_first", "window": 6}])
def test_given_frames_are_cached_as_the_clean_context_write(tiny_model, ctx, options):
    """Under every order, each time block m reads the cache it holds exactly what block-first's clean-context write
    of the same frames leaves there (block-first from scratch, at block m)."""
    m, window = 2, options.get("window")
    with torch.no_grad():
        reference = CacheProbe(tiny_model, m, window)
        video = sample(reference, ctx, 12, LATENT, cfg(order="block_first", window=window), NoiseBank(0))
        probe = CacheProbe(tiny_model, m, window)
        out = sample(probe, ctx, 12, LATENT, cfg(**options), NoiseBank(5), prefix=video[:, :m * F])
    assert len(probe.seen) >= 4 and reference.seen  # at least one forward per step
    frames, held = reference.seen[0]
    for seen_frames, seen in probe.seen:
        assert seen_frames == frames == list(range(probe.first_visible, m * F))
        assert all(torch.equal(a, b) for a, b in zip(seen, held))
    assert torch.equal(out[:, :m * F], video[:, :m * F]) and not torch.equal(out, video)


def test_fused_writes_and_streaming_continue_the_same_video(tiny_model, ctx):
    """fuse_writes (the last given block's write rides in block m's first forward) gives the unfused result up to
    rounding; the stream yields the given blocks first (given=True), decoded, then the sampled ones."""
    prefix = torch.randn(1, 2 * F, *LATENT, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for order, level in (("block_first", "next"), ("step_first", "next"), ("step_first", "current")):
            plain = sample(tiny_model, ctx, 12, LATENT, cfg(order=order, context_level=level), NoiseBank(0),
                           prefix=prefix)
            fused = sample(tiny_model, ctx, 12, LATENT, cfg(order=order, context_level=level, fuse_writes=True),
                           NoiseBank(0), prefix=prefix)
            torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
        blocks = list(stream(tiny_model, ctx, 12, LATENT, cfg(), NoiseBank(0), prefix=prefix))
    assert [b.given for b in blocks] == [True, True, False, False] and [b.index for b in blocks] == [0, 1, 2, 3]
    assert torch.equal(torch.cat([b.latents for b in blocks], 1),
                       sample(tiny_model, ctx, 12, LATENT, cfg(), NoiseBank(0), prefix=prefix))


def test_forward_counts_with_given_blocks(tiny_model, ctx):
    """Given blocks run no cells: block-first (N-m)S + N-1 forwards, step-first S(2N-1-m)."""
    from src.perf.sampler_bench import ForwardCounter

    prefix = torch.randn(1, 2 * F, *LATENT)
    n, m, s = 4, 2, 4
    for order, expected in (("block_first", (n - m) * s + n - 1), ("step_first", s * (2 * n - 1 - m))):
        counter = ForwardCounter(tiny_model)
        with torch.no_grad():
            sample(counter, ctx, n * F, LATENT, cfg(order=order), NoiseBank(0), prefix=prefix)
        assert counter.forwards == expected, order


def test_prompt_switch_at_the_seam_equals_the_new_prompt(tiny_model, ctx):
    """A switch at the seam re-caches the context under the new prompt: the same continuation (up to rounding) as
    writing it under the new prompt from the start; the given frames are unchanged."""
    other = torch.randn_like(ctx)
    prefix = torch.randn(1, 2 * F, *LATENT, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for order in ("block_first", "step_first"):
            switched = sample(tiny_model, {0: ctx, 2: other}, 12, LATENT, cfg(order=order), NoiseBank(0),
                              prefix=prefix)
            new = sample(tiny_model, other, 12, LATENT, cfg(order=order), NoiseBank(0), prefix=prefix)
            old = sample(tiny_model, ctx, 12, LATENT, cfg(order=order), NoiseBank(0), prefix=prefix)
            torch.testing.assert_close(switched, new, rtol=1e-4, atol=1e-4)
            assert torch.equal(switched[:, :2 * F], prefix) and (switched - old).abs().max() > 1e-3  # the prompt matters


def test_prefix_errors(tiny_model, ctx):
    with pytest.raises(ValueError, match="positive multiple of the block size 3 below num_frames=12"):
        sample(tiny_model, ctx, 12, LATENT, cfg(), NoiseBank(0), prefix=torch.randn(1, 4, *LATENT))
    with pytest.raises(ValueError, match="positive multiple of the block size 3 below num_frames=12"):
        sample(tiny_model, ctx, 12, LATENT, cfg(), NoiseBank(0), prefix=torch.randn(1, 12, *LATENT))
    with pytest.raises(ValueError, match=r"given frames must be \[1, m \* 3, 4, 4, 4\]"):
        sample(tiny_model, ctx, 12, LATENT, cfg(), NoiseBank(0), prefix=torch.randn(1, 3, 4, 2, 2))


# ------------------------------------------------------------------------------------------- alignment rules


def video(frames: int) -> torch.Tensor:
    """[1, frames, 3, 2, 2]: frame i is filled with i / 100 (so a frame's origin is readable)."""
    return (torch.arange(frames, dtype=torch.float32) / 100).view(1, frames, 1, 1, 1).expand(1, frames, 3, 2, 2)


def origins(frames: torch.Tensor) -> list[int]:
    return [round(float(v) * 100) for v in frames[0, :, 0, 0, 0]]


@pytest.mark.parametrize("tc, pixels, context_frames, kept, dropped, padded, k", [
    # toy codec (one pixel frame per latent frame), blocks of 3
    (1, 1, None, [0, 0, 0], 0, 2, 3),  # an image: one latent frame, padded to a still block
    (1, 2, None, [0, 0, 1], 0, 1, 3),  # shorter than a block: the first frame repeated at the front
    (1, 7, None, [1, 2, 3, 4, 5, 6], 1, 0, 6),  # off-block: the oldest frame trimmed to whole blocks
    (1, 7, 3, [4, 5, 6], 4, 0, 3),  # context_frames: the last 3 latent frames
    # Wan VAE: 1 + 4j pixel frames -> 1 + j latent frames (causal first frame)
    (4, 1, None, [0] * 9, 0, 8, 3),  # an image: one latent frame, a still clip of 1 + 4*2 pixel frames
    (4, 5, None, [0, 0, 0, 0, 0, 1, 2, 3, 4], 0, 4, 3),  # 2 latent frames < a block: padded at the front
    (4, 10, None, list(range(1, 10)), 1, 0, 3),  # 10 = 1 + 4*2 + 1: the oldest frame dropped (causal first frame)
    (4, 13, None, list(range(4, 13)), 4, 0, 3),  # 4 latent frames: the oldest latent frame trimmed
    (4, 25, 6, list(range(4, 25)), 4, 0, 6),  # 7 latent frames, the last 6: 1 + 4*5 pixel frames
])
def test_alignment_rules(tc, pixels, context_frames, kept, dropped, padded, k):
    frames, a = align(video(pixels), tc, F, context_frames)
    assert origins(frames) == kept
    assert (a.source_frames, a.dropped, a.padded, a.latent_frames) == (pixels, dropped, padded, k)
    assert frames.shape[1] == 1 + tc * (k - 1)


def test_alignment_errors():
    with pytest.raises(ValueError, match="context_frames=4 must be a positive multiple of the block size 3"):
        align(video(7), 1, F, 4)
    with pytest.raises(ValueError, match="context_frames=9 but the context holds only 7 latent frames"):
        align(video(7), 1, F, 9)
    with pytest.raises(ValueError, match="context_frames=6 but the context holds only 3 latent frames"):
        align(video(12), 4, F, 6)  # 12 pixel frames = 1 + 4*2 (+ 3 dropped): 3 latent frames


class CausalCodec:
    """A stand-in with Wan's frame arithmetic: 1 + 4j pixel frames -> 1 + j latent frames (the causal first frame
    alone, then every 4th frame), as the real VAE checks."""

    temporal_compression = 4

    def encode(self, pixels):
        assert (pixels.shape[1] - 1) % 4 == 0
        return pixels[:, ::4].flatten(2, 3)


def test_encode_context_images_and_videos(tmp_path):
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    quantised = (((image + 1) * 127.5).round() / 127.5 - 1)
    png = tmp_path / "first.png"
    iio.imwrite(png, ((image + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy())
    codec = ToyCodec(2)
    from_tensor, a = encode_context(codec, quantised, frames_per_block=F, height=16, width=16)
    from_png, _ = encode_context(codec, png, frames_per_block=F, height=16, width=16)
    from_pil, _ = encode_context(codec, Image.open(png), frames_per_block=F, height=16, width=16)
    assert from_tensor.shape == (1, 3, 12, 8, 8) and a.padded == 2
    torch.testing.assert_close(from_png, from_tensor)
    torch.testing.assert_close(from_pil, from_tensor)
    torch.testing.assert_close(codec.decode(from_tensor)[0], quantised.expand(3, 3, 16, 16))  # a still block
    latents, a = encode_context(CausalCodec(), torch.zeros(14, 3, 16, 16), frames_per_block=F, height=16, width=16)
    assert latents.shape[1] == 3 and (a.dropped, a.latent_frames) == (5, 3)  # 14 -> 1 + 4*3 + 1 -> 9 frames


def test_frame_size_and_input_errors(tmp_path):
    small = torch.rand(2, 3, 16, 16) * 2 - 1
    big = small.repeat_interleave(2, -1).repeat_interleave(2, -2)  # as src.generate's mp4s (nearest upscale)
    assert torch.equal(fit_size(big[None], 16, 16), small[None])
    with pytest.raises(ValueError, match="context frames are 20x20; the world's videos are 16x16"):
        fit_size(torch.zeros(1, 1, 3, 20, 20), 16, 16)
    with pytest.raises(ValueError, match=r"context pixels must lie in \[-1, 1\]"):
        load_frames(torch.full((3, 16, 16), 255.0))
    with pytest.raises(ValueError, match=r"a context tensor must be \[3, H, W\]"):
        load_frames(torch.zeros(16, 16))
    with pytest.raises(FileNotFoundError, match="context file not found"):
        load_frames(tmp_path / "missing.mp4")
    with pytest.raises(TypeError, match="context must be an image"):
        load_frames(np.zeros((16, 16, 3)))


# ------------------------------------------------------------------------------------------- the API


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from src.api import HiAR
    from src.checkpoints import save_dit

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_dit(WanDiT(WanConfig(dim=32, ffn_dim=64, freq_dim=32, num_heads=2, num_layers=1, in_dim=12, out_dim=12,
                              text_len=16, text_dim=64)), path)
    return HiAR.from_checkpoint(path, device="cpu", overrides=["model_config=null", "sampler.steps=[1000,500]"])


def test_api_context(pipe):
    """generate/stream with a context: the video starts with it (the toy codec reconstructs it exactly), continues
    from the next block, and equals the sampler's continuation of the encoded frames."""
    prompt = "a red circle moving left on a black background"
    given = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = pipe.generate(prompt, num_frames=9, context=given)
    assert out.shape == (1, 9, 3, 16, 16)
    torch.testing.assert_close(out[0, :3], given[2:], rtol=0, atol=1e-5)  # 5 frames -> the last whole block
    blocks = list(pipe.stream(prompt, num_frames=9, context=given))
    assert [b.given for b in blocks] == [True, False, False]
    assert torch.equal(torch.cat([b.pixels[0] for b in blocks]), out[0])
    both = pipe.generate([prompt, prompt], num_frames=9, context=[given, given[:1]])
    torch.testing.assert_close(both[1, :3], given[:1].expand(3, -1, -1, -1), rtol=0, atol=1e-5)  # an image
    assert torch.equal(both[0], out[0])
    with pytest.raises(ValueError, match="the context has 3 latent frames: num_frames=3 leaves nothing"):
        pipe.generate(prompt, num_frames=3, context=given)
    with pytest.raises(ValueError, match="prompt switch at latent frame 3 falls inside the 6 context frames"):
        pipe.generate(f"{prompt} | {prompt}", num_frames=12, switch_every=3, context=torch.cat([given, given[:1]]))
    with pytest.raises(ValueError, match="2 contexts for 1 prompts"):
        pipe.generate(prompt, num_frames=9, context=[given, given])


def test_pipelined_sampler_continues_like_step_first(tiny_model, ctx):
    """The pipelined sampler (one process here) writes the given blocks into each step's cache as step-first does:
    the same video bit for bit (fused: up to rounding)."""
    from src.sampling.pipeline import pipeline_sample

    prefix = torch.randn(1, 2 * F, *LATENT, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = sample(tiny_model, ctx, 12, LATENT, cfg(), NoiseBank(0), prefix=prefix)
        assert torch.equal(pipeline_sample(tiny_model, ctx, 12, LATENT, cfg(), NoiseBank(0), prefix=prefix), reference)
        fused = pipeline_sample(tiny_model, ctx, 12, LATENT, cfg(), NoiseBank(0), fuse=True, prefix=prefix)
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)


def test_experiment_seam_error_and_prompt_switch():
    """experiments/continuation: the seam error is the oracle's centroid distance on the torus, in px; the switch turns
    the direction by 90 degrees and keeps the rest of the prompt."""
    from experiments.continuation.run import seam_error, turned
    from src.worlds.toy.shapes import parse_prompt, render_video

    prompt = "a red circle moving left on a black background"
    truth = render_video(parse_prompt(prompt), 6, 16, 16, seed=0)
    assert seam_error(truth, truth, prompt, 3) == 0.0
    shifted = torch.roll(truth, shifts=(2, 15), dims=(-2, -1))  # 2 px down, 1 px left (across the edge)
    assert seam_error(shifted, truth, prompt, 3) == pytest.approx(5 ** 0.5, abs=1e-3)
    assert seam_error(torch.full_like(truth, -1.0), truth, prompt, 3) == float("inf")  # no object: infinite
    assert turned(prompt) == "a red circle moving up on a black background"


def test_experiment_pairs_each_continuation_with_its_scratch_row():
    """experiments/continuation report: a continuation's fidelity minus the same student's from scratch, video by
    video: mean and standard error over the videos."""
    from experiments.continuation.run import versus_scratch

    def record(fidelities):
        return {"videos": [{"fidelity": f} for f in fidelities]}

    mean, se = versus_scratch(record([1.0, 0.0, 1.0, 1.0]), record([1.0, 1.0, 0.0, 0.0]))  # differences 0, -1, 1, 1
    assert mean == pytest.approx(0.25) and se == pytest.approx(float(np.std([0, -1, 1, 1], ddof=1)) / 2)
    with pytest.raises(ValueError):  # different video sets never pair
        versus_scratch(record([1.0]), record([1.0, 0.0]))
