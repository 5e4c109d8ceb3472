"""Toy world: data, shards, oracle (perfect on ground truth, catches planted faults), codec and text encoder."""

import io
import itertools

import numpy as np
import pytest
import torch
import webdataset as wds

from src.worlds.toy.codec import ToyCodec
from src.worlds.toy.data import ToyVideoDataModule, from_uint8, shard_paths, write_shards
from src.worlds.toy.oracle import score_video, score_videos
from src.worlds.toy.shapes import (
    BACKGROUND_COLORS,
    DIRECTIONS,
    RADIUS,
    SPEED_RANGE,
    TRAIN_ATTRIBUTES,
    all_attributes,
    heldout_prompts,
    num_frames,
    parse_prompt,
    prompt_from_attributes,
    render_video,
    sample_attributes,
    to_signed,
    training_attributes,
    trajectory,
)
from src.worlds.toy.text import ToyTextEncoder

ATTRS = {"shape": "circle", "color": "red", "background": "dark blue", "direction": "left"}


def test_prompt_round_trip_and_heldout_split():
    for attrs in all_attributes():
        assert parse_prompt(prompt_from_attributes(attrs)) == attrs
    assert prompt_from_attributes(ATTRS) == "a red circle moving left on a dark blue background"
    assert parse_prompt("An Orange square moving up on a gray background")["color"] == "orange"
    heldout = heldout_prompts(32)
    assert len(set(heldout)) == 32
    assert not set(heldout) & {prompt_from_attributes(a) for a in TRAIN_ATTRIBUTES}
    rng = np.random.default_rng(0)
    assert all(prompt_from_attributes(sample_attributes(rng)) not in heldout for _ in range(200))
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        parse_prompt("a cat sitting on a mat")
    with pytest.raises(ValueError, match="unknown color"):
        prompt_from_attributes({**ATTRS, "color": "beige"})


def test_render_video_is_seeded_moves_and_stays_in_range():
    video = render_video(ATTRS, 81, 16, 16, seed=3)
    assert video.shape == (81, 3, 16, 16) and video.min() >= -1 and video.max() <= 1
    assert torch.equal(video, render_video(ATTRS, 81, 16, 16, seed=3))
    assert (video - render_video(ATTRS, 81, 16, 16, seed=4)).abs().mean() > 0.01  # another seed, another video
    assert (video[1:] - video[:-1]).abs().amax(dim=(1, 2, 3)).min() > 0  # never frozen
    assert render_video(ATTRS, 5, 32, 24, seed=0).shape == (5, 3, 32, 24)


@pytest.mark.parametrize("attrs", all_attributes()[::7])
def test_motion_wraps_around_the_edges_and_never_turns(attrs):
    dx, dy = DIRECTIONS[attrs["direction"]]
    axis, sense = (0, dx) if dx else (1, dy)
    starts = []
    for seed in range(20):
        path = trajectory(attrs, 81, 16, 16, seed)
        assert ((path >= 0) & (path < 16)).all()
        steps = np.diff(path, axis=0)
        wraps = np.abs(steps[:, axis]) > 8  # leaving one edge, re-entering at the other
        assert wraps.sum() >= 1  # 81 frames at >= 0.3 px/frame cross a 16 px frame at least once
        along = np.where(wraps, steps[:, axis] - 16 * np.sign(steps[:, axis]), steps[:, axis])
        assert (np.sign(along) == sense).all() and np.allclose(along, along[0])  # one constant velocity, forever
        assert SPEED_RANGE[0] <= abs(along[0]) <= SPEED_RANGE[1] and (steps[:, 1 - axis] == 0).all()
        starts.append(path[0, axis])
    assert np.histogram(starts, bins=4, range=(0, 16))[0].min() >= 1  # random phases: starts all over the frame


def test_an_object_crossing_an_edge_is_drawn_on_both_sides_with_its_whole_area():
    attrs = {**ATTRS, "shape": "square", "direction": "right"}
    video = render_video(attrs, 81, 16, 16, seed=1)
    covered = (video - to_signed(BACKGROUND_COLORS[attrs["background"]])[None, :, None, None]).norm(dim=1)
    covered = covered / covered.max()  # coverage in [0, 1] (the object colour is the maximum distance)
    assert torch.allclose(covered.sum((1, 2)), torch.full((81,), np.pi * RADIUS**2), rtol=0.05)  # area kept (supersampled)
    split = (covered[:, :, 0] > 0.5).any(1) & (covered[:, :, -1] > 0.5).any(1)
    assert split.any()  # some frames show the object straddling the left and right edges


def test_time_base_is_wans_latent_timeline():
    assert num_frames(5) == 21 and num_frames(20) == 81 and num_frames(4) == 17
    with pytest.raises(ValueError, match="seconds"):
        num_frames(-1)


def test_shards_round_trip(tmp_path):
    paths = write_shards(tmp_path, num_videos=6, num_frames=9, seed=1, videos_per_shard=2)
    assert len(paths) == 3 == len(shard_paths(tmp_path))
    for sample in wds.WebDataset(paths, shardshuffle=False).decode():
        meta = sample["json"]
        attrs = {k: meta[k] for k in ("shape", "color", "background", "direction")}
        assert sample["txt"] == meta["prompt"] == prompt_from_attributes(attrs)
        expected = render_video(attrs, 9, 16, 16, meta["seed"])
        assert (from_uint8(sample["npy"]) - expected).abs().max() <= 1 / 127.5


def first_batches(module: ToyVideoDataModule, n: int) -> list[dict]:
    return list(itertools.islice(module.train_dataloader(), n))


def test_datamodule_writes_then_reads_shards_and_renders_on_the_fly(tmp_path):
    module = ToyVideoDataModule(shard_dir=str(tmp_path / "shards"), num_videos=4, num_frames=6, batch_size=2)
    module.prepare_data()
    batches = first_batches(module, 3)
    assert [b["video"].shape for b in batches] == [(2, 6, 3, 16, 16)] * 3
    assert [int(b["iteration"]) for b in batches] == [0, 1, 2] and batches[0]["index"].tolist() == [0, 1]
    index = module.video_index()
    videos = [from_uint8(np.load(io.BytesIO(index.read(i)["npy"]))) for i in range(4)]
    epoch = torch.cat([b["video"] for b in batches[:2]])  # iterations 0-1 read every video once, in a seeded order
    assert sorted(next(i for i, v in enumerate(videos) if torch.equal(v, e)) for e in epoch) == [0, 1, 2, 3]
    assert all(parse_prompt(p) for b in batches for p in b["prompt"])
    wrong_length = ToyVideoDataModule(shard_dir=str(tmp_path / "shards"), num_frames=9)
    with pytest.raises(ValueError, match="do not match this toy world.*num_frames"):
        wrong_length.prepare_data()  # shards of another clip length (or generator version) are refused, not used
    procedural = ToyVideoDataModule(source="procedural", num_frames=6, batch_size=3)
    assert first_batches(procedural, 1)[0]["video"].shape == (3, 6, 3, 16, 16)


WARMUP = {"shape": "circle", "color": "red", "background": "black"}


def test_sample_attributes_holds_fixed_attributes_and_refuses_impossible_ones():
    rng = np.random.default_rng(0)
    drawn = [sample_attributes(rng, WARMUP) for _ in range(64)]
    assert all({k: a[k] for k in WARMUP} == WARMUP for a in drawn)
    assert {a["direction"] for a in drawn} == set(DIRECTIONS)  # the direction still varies
    assert len(training_attributes({"color": "red"})) == len([a for a in TRAIN_ATTRIBUTES if a["color"] == "red"])
    with pytest.raises(ValueError, match="unknown attributes"):
        sample_attributes(rng, {"colour": "red"})
    heldout = parse_prompt(heldout_prompts(1)[0])
    with pytest.raises(ValueError, match="no training attribute combination"):
        training_attributes(heldout)  # a held-out combination is never trained on


def _attributes_of(batch) -> list[dict]:
    return [{k: v for k, v in parse_prompt(p).items() if k != "direction"} for p in batch["prompt"]]


class Resumed:
    """What the datamodule reads of a trainer resumed after `steps` optimizer steps (rank `rank` of `world`)."""

    def __init__(self, steps: int, rank: int = 0, world: int = 1):
        self.global_step, self.accumulate_grad_batches, self.global_rank, self.world_size = steps, 1, rank, world
        self.lightning_module = object()


def test_warmup_world_comes_first_once_and_is_not_repeated_on_resume():
    kw = {"source": "procedural", "num_frames": 5, "warmup_batches": 4, "warmup_attributes": WARMUP,
          "warmup_frames": 3}
    batches = first_batches(ToyVideoDataModule(batch_size=4, **kw), 6)
    assert [all(a == WARMUP for a in _attributes_of(b)) for b in batches] == [True] * 4 + [False] * 2
    assert [b["video"].shape[1] for b in batches] == [3] * 4 + [5] * 2
    resumed = ToyVideoDataModule(batch_size=4, **kw)
    resumed.trainer = Resumed(3)  # a run resumed after 3 steps reads iterations 3, 4, 5: the last warm-up batch once
    assert all(torch.equal(r["video"], b["video"]) for r, b in zip(first_batches(resumed, 3), batches[3:]))
    halves = []  # 2 ranks of per-rank batch 2 read the halves of the 1-rank batch of 4, warm-up and after
    for rank in range(2):
        half = ToyVideoDataModule(batch_size=2, **kw)
        half.trainer = Resumed(3, rank, 2)
        halves.append(first_batches(half, 2))
    assert all(torch.equal(torch.cat([halves[0][i]["video"], halves[1][i]["video"]]), batches[3 + i]["video"])
               for i in range(2))
    workers = ToyVideoDataModule(batch_size=4, num_workers=2, **kw)  # two workers interleave iterations in order
    assert all(torch.equal(w["video"], b["video"]) for w, b in zip(first_batches(workers, 6), batches))
    with pytest.raises(ValueError, match="no training attribute combination"):
        ToyVideoDataModule(source="procedural", warmup_batches=1, warmup_attributes={**WARMUP, "color": "beige"})
    with pytest.raises(ValueError, match="warmup_frames"):
        ToyVideoDataModule(source="procedural", num_frames=5, warmup_batches=1, warmup_frames=9)


def _scalars(scores):
    return {k: v for k, v in scores.items() if k not in ("segments", "drift")}


@pytest.mark.parametrize("num_frames", [21, 81])
def test_oracle_is_perfect_on_ground_truth(num_frames):
    rng = np.random.default_rng(num_frames)
    attrs = [sample_attributes(rng) for _ in range(4)]
    videos = [render_video(a, num_frames, 16, 16, seed=i) for i, a in enumerate(attrs)]
    scores = score_videos(videos, [prompt_from_attributes(a) for a in attrs])
    assert scores["fidelity"] == scores["object_found"] == scores["direction_agreement"] == 1.0
    assert scores["smoothness"] == scores["shape_agreement"] == scores["dynamic"] == 1.0
    assert scores["object_color_error"] < 0.01 and scores["background_color_error"] < 0.01 and scores["speckle"] == 0
    assert 0.9 * SPEED_RANGE[0] <= scores["motion"] <= 1.1 * SPEED_RANGE[1]
    assert all(len(v) == 5 for v in scores["segments"].values())
    assert abs(scores["drift"]["fidelity"]["slope"]) < 1e-9 and scores["drift"]["object_found"]["first_last"] == 0


def test_oracle_detects_planted_faults():
    prompt = prompt_from_attributes(ATTRS)
    video = render_video(ATTRS, 21, 16, 16, seed=0)
    assert score_video(video, prompt)["fidelity"] == 1.0

    wrong_color = score_video(render_video({**ATTRS, "color": "green"}, 21, 16, 16, seed=0), prompt)
    assert wrong_color["fidelity"] == 0 and wrong_color["object_found"] == 0
    assert wrong_color["object_color_error"] > 0.5

    shifted = score_video((video + torch.tensor([0.0, 0.9, 0.0])[:, None, None]).clamp(-1, 1), prompt)
    assert shifted["fidelity"] == 0 and shifted["object_color_error"] > 0.5

    frozen = score_video(video[:1].expand(21, -1, -1, -1), prompt)
    assert frozen["fidelity"] == 0 and frozen["motion"] < 0.01 and frozen["direction_agreement"] == 0

    reversed_motion = score_video(render_video({**ATTRS, "direction": "right"}, 21, 16, 16, seed=0), prompt)
    assert reversed_motion["fidelity"] == 0 and reversed_motion["direction_agreement"] == 0

    for other in ("square", "triangle"):
        wrong_shape = score_video(render_video({**ATTRS, "shape": other}, 21, 16, 16, seed=0), prompt)
        assert wrong_shape["fidelity"] == 1 and wrong_shape["shape_agreement"] == 0  # fidelity does not ask the shape

    noisy = score_video(video + 0.3 * torch.randn(video.shape, generator=torch.Generator().manual_seed(0)), prompt)
    assert noisy["background_color_error"] > 0.3 and noisy["speckle"] > 0.5

    vanishing = video.clone()
    vanishing[11:] = to_signed(BACKGROUND_COLORS[ATTRS["background"]])[:, None, None]
    gone = score_video(vanishing, prompt)
    assert gone["fidelity"] == 0 and 0.4 < gone["object_found"] < 0.6
    assert gone["drift"]["object_found"]["first_last"] == -1 and gone["drift"]["object_found"]["slope"] < -0.2


def test_oracle_is_robust_to_speckles():
    prompt = prompt_from_attributes(ATTRS)
    video = render_video(ATTRS, 21, 16, 16, seed=0)
    generator = torch.Generator().manual_seed(0)
    speckles = torch.rand(video.shape[0], 1, 16, 16, generator=generator) < 0.03
    colors = torch.rand(video.shape, generator=generator) * 2 - 1
    scores = score_video(torch.where(speckles, colors, video), prompt)
    assert scores["fidelity"] == 1.0 and scores["object_found"] == 1.0
    assert 0.01 < scores["speckle"] < 0.05  # the speckles are counted, not mistaken for the object


def test_oracle_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[T, 3, H, W\]"):
        score_video(torch.zeros(21, 16, 16), prompt_from_attributes(ATTRS))
    with pytest.raises(ValueError, match="frames per segment"):
        score_video(torch.zeros(8, 3, 16, 16), prompt_from_attributes(ATTRS), segments=5)


def test_codec_is_an_exact_round_trip():
    codec = ToyCodec(factor=2)
    pixels = torch.rand(2, 5, 3, 16, 16) * 2 - 1
    latents = codec.encode(pixels)
    assert latents.shape == (2, 5, 12, 8, 8) and codec.latent_channels == 12
    assert codec.temporal_compression == 1 and codec.spatial_compression == 2 and codec.num_pixel_frames(5) == 5
    torch.testing.assert_close(codec.decode(latents), pixels, atol=1e-6, rtol=0)
    streaming = codec.streaming_decoder()
    blocks = [streaming.decode_next(latents[:, i : i + 2]) for i in range(0, 5, 2)]
    torch.testing.assert_close(torch.cat(blocks, 1), pixels, atol=1e-6, rtol=0)
    data = torch.stack([render_video(sample_attributes(np.random.default_rng(i)), 9, 16, 16, i) for i in range(16)])
    normalised = codec.encode(data)
    assert normalised.mean().abs() < 0.5 and 0.5 < normalised.std() < 1.5
    with pytest.raises(ValueError, match="not divisible"):
        codec.encode(torch.zeros(1, 1, 3, 15, 16))


def test_text_encoder_is_deterministic_and_order_sensitive():
    encoder = ToyTextEncoder(text_len=16, text_dim=64, seed=0)
    prompts = ["a red circle moving left on a dark blue background", "a blue circle moving left on a dark red background",
               "a zebra", ""]
    embeddings, mask = encoder.encode(prompts)
    again, _ = ToyTextEncoder(text_len=16, text_dim=64, seed=0).encode(prompts)
    assert embeddings.shape == (4, 16, 64) and torch.equal(embeddings, again)
    assert mask[0].sum() == 10 and mask[2].sum() == 2 and not mask[3].any()
    assert (embeddings[~mask] == 0).all()
    assert not torch.allclose(embeddings[0], embeddings[1])  # same words, different order
    assert (embeddings - ToyTextEncoder(seed=1).encode(prompts)[0]).abs().max() > 0.1  # the seed matters
    assert not any(p.requires_grad for p in encoder.parameters())
