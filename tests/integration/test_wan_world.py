"""The Wan world on tiny random umT5 / Wan-VAE models: original-format conversion, normalisation, streaming decode,
missing files, configs. Original-format files are written by the tiny-release generator (src/worlds/wan/tiny.py),
which inverts the names independently of src/worlds/wan/convert.py; they are checked against diffusers' own VAE
converter and a reference Wan T5 forward."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from src.worlds.wan import WAN_NEGATIVE_PROMPT, WanTextEncoder, WanVAE, check_files, check_world_files
from src.worlds.wan.convert import t5_original_to_transformers, umt5_config_from_original, vae_original_to_diffusers
from src.worlds.wan.text import clean_prompt
from src.worlds.wan.tiny import diffusers_to_wan_vae, tiny_tokenizer, tiny_umt5, tiny_vae
from src.worlds.wan.tiny import transformers_to_wan_t5 as hf_to_wan_t5
from src.worlds.wan.vae import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD

CONF = Path(__file__).resolve().parents[2] / "conf"
TEXT_LEN = 16
# the string in Wan2.1 wan/configs/shared_config.py, copied as one piece
NEG = "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"  # noqa: E501
TINY_VAE = dict(
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    latents_mean=[0.5, -1.0, 0.25, 2.0],
    latents_std=[2.0, 0.5, 1.5, 3.0],
)


@pytest.fixture(scope="module")
def t5_files(tmp_path_factory):
    """A tiny umT5 in both formats plus a tokenizer folder (umT5-style Unigram, EOS appended), built offline."""
    root = tmp_path_factory.mktemp("t5")
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    model = tiny_umt5(len(tokenizer), d_model=16, d_kv=8, d_ff=24, num_layers=2, num_heads=2)
    torch.save(hf_to_wan_t5(model.state_dict()), root / "t5.pth")
    model.save_pretrained(root / "text_encoder")
    return root, model


@pytest.fixture(scope="module")
def vae_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    model = tiny_vae(TINY_VAE)
    torch.save(diffusers_to_wan_vae(model.state_dict()), root / "Wan2.1_VAE.pth")
    model.save_pretrained(root / "vae")
    return root, model


def _encoder(root, fmt="pth", **kw):
    weights = root / ("t5.pth" if fmt == "pth" else "text_encoder")
    kw = dict(text_len=TEXT_LEN, text_dim=16, dtype="float32") | kw
    return WanTextEncoder(weights, root / "tokenizer", **kw)


# --------------------------------------------------------------------------------------------- text encoder


def _wan_t5_reference(sd: dict, ids: torch.Tensor, mask: torch.Tensor, heads: int, buckets: int) -> torch.Tensor:
    """Wan's T5Encoder forward (wan/modules/t5.py) written out on the original-named tensors."""

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    def bucket(rel):
        nb = buckets // 2
        out = (rel > 0).long() * nb
        n = rel.abs()
        exact = nb // 2
        large = exact + (torch.log(n.float() / exact) / math.log(128 / exact) * (nb - exact)).long()
        return out + torch.where(n < exact, n, large.clamp(max=nb - 1))

    b, length = ids.shape
    pos = torch.arange(length)
    rel = bucket(pos[None, :] - pos[:, None])
    x = sd["token_embedding.weight"][ids]
    layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(layers):
        p = lambda n: sd[f"blocks.{i}.{n}"]  # noqa: B023
        h = rms(x, p("norm1.weight"))
        q, k, v = (h @ p(f"attn.{n}.weight").T for n in "qkv")
        q, k, v = (t.view(b, length, heads, -1) for t in (q, k, v))
        bias = p("pos_embedding.embedding.weight")[rel].permute(2, 0, 1)[None]
        bias = bias.masked_fill(mask[:, None, None, :] == 0, torch.finfo(x.dtype).min)
        att = torch.softmax(torch.einsum("binc,bjnc->bnij", q, k) + bias, dim=-1)
        x = x + torch.einsum("bnij,bjnc->binc", att, v).reshape(b, length, -1) @ p("attn.o.weight").T
        h = rms(x, p("norm2.weight"))
        gate = F.gelu(h @ p("ffn.gate.0.weight").T, approximate="tanh")
        x = x + ((h @ p("ffn.fc1.weight").T) * gate) @ p("ffn.fc2.weight").T
    return rms(x, sd["norm.weight"])


def test_text_encoder_from_original_matches_wan_reference(t5_files):
    root, model = t5_files
    enc = _encoder(root)
    prompts = ["a red  ball runs over the grass", "the big cat jumps &amp; the dog"]
    emb, mask = enc.encode(prompts)
    assert emb.shape == (2, TEXT_LEN, 16) and mask.shape == (2, TEXT_LEN) and mask.dtype == torch.bool
    # cleaning collapses the double space and unescapes &amp;; every real token (EOS last) is kept, padding zeroed
    cleaned = [clean_prompt(p) for p in prompts]
    assert cleaned[1] == "the big cat jumps & the dog"
    ids = [enc.tokenizer(c)["input_ids"] for c in cleaned]
    assert mask.sum(1).tolist() == [len(i) for i in ids] and all(i[-1] == enc.tokenizer.eos_token_id for i in ids)
    assert ids[0] == enc.tokenizer("a red ball runs over the grass")["input_ids"]
    assert (emb[~mask] == 0).all() and (emb[mask].abs().sum(-1) > 0).all()

    tokens = enc.tokenizer(
        [clean_prompt(p) for p in prompts],
        padding="max_length",
        max_length=TEXT_LEN,
        truncation=True,
        return_tensors="pt",
    )
    original = torch.load(root / "t5.pth", weights_only=True)
    ref = _wan_t5_reference(original, tokens["input_ids"], tokens["attention_mask"], heads=2, buckets=32)
    assert (emb - ref)[mask].abs().max() < 1e-5
    with torch.no_grad():
        direct = model(**tokens).last_hidden_state
    assert (emb - direct)[mask].abs().max() < 1e-6


def test_text_encoder_formats_agree_and_bf16(t5_files):
    root, _ = t5_files
    prompts = ["a cat", "blue sky over the red ball"]
    emb_pth, mask = _encoder(root, "pth").encode(prompts)
    emb_dir, mask_dir = _encoder(root, "folder").encode(prompts)
    assert torch.equal(mask, mask_dir) and (emb_pth - emb_dir).abs().max() < 1e-6
    emb_bf16, _ = _encoder(root, "pth", dtype="bfloat16").encode(prompts)
    assert emb_bf16.dtype == torch.bfloat16
    assert (emb_bf16.float() - emb_pth).abs().max() < 0.1 * emb_pth.abs().max()


def test_negative_prompt_encoded_once_and_encoder_kept_out_of_the_module(t5_files):
    root, _ = t5_files
    enc = _encoder(root, negative_prompt="the dog runs")
    calls = []
    enc.umt5.register_forward_hook(lambda *_: calls.append(1))
    first, _ = enc.encode(["the dog runs"])
    again, _ = enc.encode(["the dog runs", "a cat", "the dog runs"])
    assert len(calls) == 2  # the second call ran "a cat" only
    assert torch.equal(first[0], again[0]) and torch.equal(again[0], again[2])
    solo, _ = enc.encode(["a cat"])
    assert torch.allclose(solo[0], again[1], atol=1e-6)
    assert next(enc.umt5.parameters()).device.type == "cpu"  # offloaded
    assert not any(p.is_meta for p in enc.umt5.parameters())  # built on meta, every tensor assigned
    assert enc.umt5.encoder.embed_tokens.weight is enc.umt5.shared.weight  # one embedding matrix
    assert enc.state_dict() == {} and not any(p.numel() for p in enc.parameters())
    with pytest.raises(TypeError):
        enc.encode("a cat")
    with pytest.raises(ValueError, match="width"):
        _encoder(root, text_dim=32)


def test_umt5_xxl_key_coverage():
    """Every tensor of the real umT5-XXL encoder (meta tensors) maps back from Wan names; the config is recovered."""
    from transformers import UMT5Config, UMT5EncoderModel

    xxl = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
    with torch.device("meta"):
        model = UMT5EncoderModel(xxl)
    original = hf_to_wan_t5(model.state_dict())
    assert len(original) == 2 + 24 * 10
    assert set(t5_original_to_transformers(original)) == set(model.state_dict())
    cfg = umt5_config_from_original(original)
    for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets"):
        assert getattr(cfg, key) == getattr(xxl, key), key
    with pytest.raises(ValueError, match="not original Wan2.1 names"):
        t5_original_to_transformers({**original, "blocks.0.extra.weight": torch.zeros(1)})


# --------------------------------------------------------------------------------------------- VAE


def _raw_stats(model):
    mean = torch.tensor(model.config.latents_mean).view(1, -1, 1, 1, 1)
    return mean, torch.tensor(model.config.latents_std).view(1, -1, 1, 1, 1)


def test_vae_conversion_agrees_with_diffusers_converter(vae_files):
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    root, model = vae_files
    original = torch.load(root / "Wan2.1_VAE.pth", weights_only=True)
    ours = vae_original_to_diffusers(original)
    theirs = convert_wan_vae_to_diffusers(original)
    assert set(ours) == set(theirs) == set(model.state_dict())
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # the full-size Wan2.1 VAE (meta tensors): same coverage
    with torch.device("meta"):
        full = AutoencoderKLWan()
    full_original = diffusers_to_wan_vae(full.state_dict())
    assert set(vae_original_to_diffusers(full_original)) == set(convert_wan_vae_to_diffusers(full_original))
    assert set(vae_original_to_diffusers(full_original)) == set(full.state_dict())


def test_vae_formats_normalisation_and_shapes(vae_files):
    root, model = vae_files
    codec = WanVAE(root / "Wan2.1_VAE.pth", dtype="float32", original_config=TINY_VAE)
    folder = WanVAE(root / "vae", dtype="float32")
    assert (codec.latent_channels, codec.temporal_compression, codec.spatial_compression) == (4, 4, 8)
    assert codec.num_pixel_frames(3) == 9

    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 9, 3, 16, 24, generator=g) * 2 - 1
    z = codec.encode(pixels)
    assert z.shape == (2, 3, 4, 2, 3) and z.dtype == torch.float32
    mean, std = _raw_stats(model)
    with torch.no_grad():
        mu = model.encode(pixels.transpose(1, 2)).latent_dist.mode()
        raw_decoded = model.decode(z.transpose(1, 2) * std + mean).sample
    assert (z - ((mu - mean) / std).transpose(1, 2)).abs().max() < 1e-5  # mean / std applied by us
    assert (folder.encode(pixels) - z).abs().max() < 1e-6

    video = codec.decode(z)
    assert video.shape == pixels.shape and video.abs().max() <= 1.0
    assert (video - raw_decoded.transpose(1, 2)).abs().max() < 1e-5
    assert (folder.decode(z) - video).abs().max() < 1e-6

    # the normalisation constants round trip: normalised 0 is the raw mean, and back
    zeros = torch.zeros(1, 2, 4, 2, 3)
    raw = codec.to_vae_latents(zeros)
    assert torch.allclose(raw, mean.expand_as(raw))
    assert torch.allclose(((raw - mean) / std).transpose(1, 2), zeros)
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        codec.encode(pixels[:, :8])
    with pytest.raises(ValueError, match="latents"):
        codec.decode(torch.zeros(1, 2, 3, 2, 2))


def test_streaming_decode_equals_one_shot(vae_files):
    root, _ = vae_files
    codec = WanVAE(root / "Wan2.1_VAE.pth", dtype="float32", original_config=TINY_VAE)
    z = torch.randn(1, 7, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        one_shot = codec.decode(z)
    stream = codec.streaming_decoder()
    for blocks in ((3, 3, 1), (1, 1, 2, 3)):
        stream.reset()
        parts, start = [], 0
        for f in blocks:
            parts.append(stream.decode_next(z[:, start : start + f]))
            start += f
        assert [p.shape[1] for p in parts][:2] == ([9, 12] if blocks[0] == 3 else [1, 4])
        streamed = torch.cat(parts, dim=1)
        assert streamed.shape == one_shot.shape
        assert (streamed - one_shot).abs().max() < 1e-5
    with pytest.raises(ValueError, match="reset"):
        stream.decode_next(torch.zeros(2, 1, 4, 2, 2))


def test_published_latent_statistics():
    from diffusers import AutoencoderKLWan

    params = inspect.signature(AutoencoderKLWan.__init__).parameters
    assert WAN21_LATENTS_MEAN == params["latents_mean"].default and len(WAN21_LATENTS_MEAN) == 16
    assert WAN21_LATENTS_STD == params["latents_std"].default and len(WAN21_LATENTS_STD) == 16
    assert WAN21_LATENTS_MEAN[:3] == [-0.7571, -0.7089, -0.9113] and WAN21_LATENTS_STD[-1] == 1.9160


# --------------------------------------------------------------------------------------------- files and configs


def _world(name: str, overrides=()):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"world={name}", *overrides]).world


def test_missing_files_give_one_error_listing_each(tmp_path, monkeypatch):
    monkeypatch.setenv("WAN_ROOT", str(tmp_path / "wan"))
    monkeypatch.setenv("WAN_TEACHER_ROOT", str(tmp_path / "wan14b"))
    world = _world("wan2.1_1.3b")
    with pytest.raises(FileNotFoundError) as err:
        check_world_files(world)
    text = str(err.value)
    for expected in (
        "wan/models_t5_umt5-xxl-enc-bf16.pth",
        "wan/google/umt5-xxl/tokenizer_config.json",
        "wan/google/umt5-xxl/tokenizer.json",
        "wan/Wan2.1_VAE.pth",
        "wan14b/config.json",
        "wan14b/diffusion_pytorch_model.safetensors",
        "wan/config.json",
        "wan/diffusion_pytorch_model.safetensors",
    ):
        assert str(tmp_path / expected) in text, expected
    assert text.count("expected at") == 8

    with pytest.raises(FileNotFoundError) as err:
        WanTextEncoder(tmp_path / "text_encoder", tmp_path / "tokenizer")
    assert str(err.value).count("expected at") == 4  # config.json, weights, 2 tokenizer files
    with pytest.raises(FileNotFoundError, match="VAE weights: expected at"):
        WanVAE(tmp_path / "vae")
    check_files({"present": Path(__file__)})


def test_sharded_teacher_requires_every_shard(tmp_path):
    root = tmp_path / "Wan2.1-T2V-14B"
    root.mkdir()
    (root / "config.json").write_text("{}")
    (root / "diffusion_pytorch_model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "s-00001-of-00002.safetensors", "b": "s-00002-of-00002.safetensors"}}'
    )
    (root / "s-00001-of-00002.safetensors").write_text("")
    from src.worlds.wan.paths import weights_files

    with pytest.raises(FileNotFoundError) as err:
        check_files(weights_files("teacher DiT", root, "diffusion_pytorch_model"))
    assert "s-00002-of-00002.safetensors" in str(err.value) and str(err.value).count("expected at") == 1


def test_world_configs(monkeypatch):
    monkeypatch.setenv("WAN_ROOT", "/data/wan13")
    monkeypatch.delenv("WAN_TEACHER_ROOT", raising=False)
    toy = _world("toy")
    wan = _world("wan2.1_1.3b")
    assert set(toy) <= set(wan) and set(wan) - set(toy) == {"paths"}
    for group in ("video", "latent", "training"):
        assert group not in toy or set(toy[group]) == set(wan[group]), group
    assert wan.critic_init == "/data/wan13" and wan.teacher_checkpoint == "/models/Wan2.1-T2V-14B"
    assert (wan.video.height, wan.video.width, wan.fps, wan.frames_per_block) == (480, 832, 16, 3)
    assert (wan.latent.channels, wan.latent.height, wan.latent.width) == (16, 60, 104)
    assert wan.student.dim == wan.critic.dim == 1536 and wan.teacher.dim == 5120
    # ODE pairs come from the 1.3B base (as officially), DMD's real score from the 14B
    assert wan.ode_teacher.dim == 1536 and wan.ode_teacher_checkpoint == "/data/wan13"
    rooted = _world("toy", ["paths.root_dir=/r"])
    assert rooted.ode_teacher == rooted.teacher and rooted.ode_teacher_checkpoint == "/r/assets/toy_teacher.safetensors"
    assert wan.critic_init_which == toy.critic_init_which == "auto"
    assert wan.text_encoder.weights == "/data/wan13/models_t5_umt5-xxl-enc-bf16.pth"
    assert wan.codec.weights == "/data/wan13/Wan2.1_VAE.pth"
    assert wan.negative_prompt == wan.text_encoder.negative_prompt == WAN_NEGATIVE_PROMPT == NEG
    small = _world("wan2.1_1.3b_teacher1.3b", ["world.paths.wan_root=/elsewhere"])
    assert small.teacher.dim == 1536 and small.teacher.num_layers == 30
    assert small.teacher_checkpoint == "/elsewhere" and small.codec.weights == "/elsewhere/Wan2.1_VAE.pth"
