"""Checkpoint formats researchers already have on disk: round trips and clear refusals."""

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from src.checkpoints import (
    CheckpointError,
    check_state_dict,
    export_training_checkpoint,
    load_dit,
    save_dit,
    wan_to_diffusers,
)
from src.models.wan import WanDiT


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_our_safetensors_round_trip(tiny_model, tmp_path):
    save_dit(tiny_model, tmp_path / "m.safetensors")
    assert _same_weights(load_dit(tmp_path / "m.safetensors"), tiny_model)


def test_original_wan_release_folder(tiny_model, tiny_config, tmp_path):
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()},
              str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t2v", **tiny_config.to_dict()}))
    assert _same_weights(load_dit(tmp_path), tiny_model)


def write_sharded(model, folder, num_shards=2):
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = sorted(state)
    size = -(-len(keys) // num_shards)
    shards = {f"diffusion_pytorch_model-{i + 1:05d}-of-{num_shards:05d}.safetensors": keys[i * size:(i + 1) * size]
              for i in range(num_shards)}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, str(folder / name))
    weight_map = {k: name for name, part in shards.items() for k in part}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_sharded_original_checkpoint(tiny_model, tiny_config, tmp_path):
    write_sharded(tiny_model, tmp_path)
    assert _same_weights(load_dit(tmp_path, config=tiny_config), tiny_model)


def _assert_bf16_copy(loaded, model):
    want = model.state_dict()
    for key, value in loaded.state_dict().items():
        assert value.dtype == torch.bfloat16 and not value.is_meta, key
        assert torch.equal(value, want[key].to(torch.bfloat16)), key  # the same rounding as a cast
    assert all(p.requires_grad for p in loaded.parameters())


def test_bf16_load_of_a_single_file(tiny_model, tmp_path):
    save_dit(tiny_model, tmp_path / "m.safetensors")
    loaded = load_dit(tmp_path / "m.safetensors", dtype=torch.bfloat16)
    _assert_bf16_copy(loaded, tiny_model)
    x, ctx = torch.randn(1, 2, 4, 4, 4), torch.randn(1, 8, 16)
    out = loaded(x, torch.tensor([500.0]), ctx)  # the bf16 model runs a forward
    assert out.dtype == x.dtype and torch.isfinite(out).all()


def test_bf16_load_of_a_sharded_checkpoint_streams_shard_by_shard(tiny_model, tiny_config, tmp_path, monkeypatch):
    import src.checkpoints as checkpoints

    write_sharded(tiny_model, tmp_path, num_shards=3)
    real_load_file, parts = checkpoints.load_file, []

    def recording_load_file(path):
        assert all(not part for part in parts), "an earlier shard was still in memory"
        parts.append(real_load_file(path))
        return parts[-1]

    monkeypatch.setattr(checkpoints, "load_file", recording_load_file)
    loaded = load_dit(tmp_path, config=tiny_config, dtype=torch.bfloat16)
    assert len(parts) == 3
    _assert_bf16_copy(loaded, tiny_model)


def test_sharded_checkpoint_with_a_bad_shape_loads_nothing(tiny_model, tiny_config, tmp_path, monkeypatch):
    import src.checkpoints as checkpoints

    write_sharded(tiny_model, tmp_path)
    name = "diffusion_pytorch_model-00002-of-00002.safetensors"
    from safetensors.torch import load_file

    part = load_file(str(tmp_path / name))
    key = sorted(part)[0]
    part[key] = torch.zeros(7)
    save_file(part, str(tmp_path / name))
    monkeypatch.setattr(checkpoints, "load_file", lambda path: pytest.fail("a shard was read before the check"))
    with pytest.raises(CheckpointError, match=key):
        load_dit(tmp_path, config=tiny_config)


def test_diffusers_transformer_folder(tiny_model, tiny_config, tmp_path):
    folder = tmp_path / "release" / "transformer"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in wan_to_diffusers(tiny_model.state_dict()).items()},
              str(folder / "diffusion_pytorch_model.safetensors"))
    c = tiny_config
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "WanTransformer3DModel", "patch_size": list(c.patch_size), "num_attention_heads": c.num_heads,
        "attention_head_dim": c.head_dim, "in_channels": c.in_dim, "out_channels": c.out_dim, "text_dim": c.text_dim,
        "freq_dim": c.freq_dim, "ffn_dim": c.ffn_dim, "num_layers": c.num_layers}))
    loaded = load_dit(tmp_path / "release", config=tiny_config)  # text_len is not in diffusers configs
    assert _same_weights(loaded, tiny_model)


@pytest.mark.parametrize("wrapper", ["", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module._orig_mod."])
def test_self_forcing_training_checkpoint(tiny_config, wrapper, tmp_path):
    torch.manual_seed(0)
    generator, critic, ema = WanDiT(tiny_config), WanDiT(tiny_config), WanDiT(tiny_config)
    export_training_checkpoint(tmp_path / "model.pt", generator=generator, critic=critic, generator_ema=ema)
    raw = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(k.startswith("model.") for k in raw["generator"])
    if wrapper:  # the same file as written by FSDP / activation checkpointing / torch.compile wrappers
        raw = {name: {k.replace("model.", "model." + wrapper, 1): v for k, v in sd.items()} for name, sd in raw.items()}
        torch.save(raw, tmp_path / "model.pt")
    assert _same_weights(load_dit(tmp_path / "model.pt", config=tiny_config), ema)  # auto = EMA
    assert _same_weights(load_dit(tmp_path / "model.pt", which="generator", config=tiny_config), generator)
    assert _same_weights(load_dit(tmp_path / "model.pt", which="critic", config=tiny_config), critic)


def test_missing_key_and_wrong_shape_load_nothing(tiny_model, tiny_config, tmp_path):
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    del state["blocks.0.ffn.0.bias"]
    state["head.head.weight"] = torch.zeros(3, 3)
    state["blocks.9.extra"] = torch.zeros(1)
    target = WanDiT(tiny_config)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        check_state_dict(target, state, "checkpoint")
    message = str(err.value)
    assert "blocks.0.ffn.0.bias" in message and "head.head.weight" in message and "blocks.9.extra" in message
    assert "nothing was loaded" in message
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


class _RunsCodeOnLoad:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_that_would_run_code_is_refused(tiny_config, tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"generator": _RunsCodeOnLoad()}, f)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_dit(path, config=tiny_config)


def test_missing_file_and_missing_config(tiny_model, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_dit(tmp_path / "nope.safetensors")
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(CheckpointError, match="config"):
        load_dit(tmp_path / "bare.safetensors")
