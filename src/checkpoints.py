"""Load and save the DiT in the checkpoint formats researchers already have on disk.

* original Wan2.1: `diffusion_pytorch_model.safetensors` (or the sharded 14B form with its index json), in a
  release folder with `config.json`;
* diffusers: a `transformer/` folder of a `...-Diffusers` release (names mapped both ways);
* Self-Forcing / HiAR training checkpoints: a `.pt` dict with `generator`, `critic`, `generator_ema`, keys prefixed
  `model.` and possibly `_fsdp_wrapped_module.`, `_checkpoint_wrapped_module.`, `_orig_mod.`;
* our own safetensors files (the config rides in the metadata) and Lightning `.ckpt` files.

Everything is checked before anything is loaded: a missing key, an unexpected key or a wrong shape raises one
`CheckpointError` listing all of them, and the model is left untouched. Pickles load with `weights_only=True`.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from src.io import atomic_path
from src.models.wan import WanConfig, WanDiT


class CheckpointError(ValueError):
    pass


# --------------------------------------------------------------------------------------------- names

# original Wan name -> diffusers WanTransformer3DModel name (wan21.md §9)
_TOP_LEVEL = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
}
_PER_BLOCK = {
    "modulation": "scale_shift_table",
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "norm3": "norm2",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_KEY = re.compile(r"^(?:blocks\.(\d+)\.)?(.+?)(?:\.(weight|bias))?$")


def _rename(key: str, top: dict[str, str], per_block: dict[str, str]) -> str:
    match = _KEY.match(key)
    block, module, param = match.groups()
    table = per_block if block is not None else top
    if module not in table:
        raise CheckpointError(f"no name mapping for key {key!r}")
    name = table[module]
    return (f"blocks.{block}." if block is not None else "") + name + (f".{param}" if param else "")


def wan_to_diffusers(state_dict: dict) -> dict:
    return {_rename(k, _TOP_LEVEL, _PER_BLOCK): v for k, v in state_dict.items()}


def diffusers_to_wan(state_dict: dict) -> dict:
    top = {v: k for k, v in _TOP_LEVEL.items()}
    per_block = {v: k for k, v in _PER_BLOCK.items()}
    return {_rename(k, top, per_block): v for k, v in state_dict.items()}


_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def strip_training_prefixes(state_dict: dict) -> dict:
    """Self-Forcing/HiAR names (`model.` + Wan name, FSDP/checkpoint/compile wrappers) -> Wan names."""
    out = {}
    for key, value in state_dict.items():
        for wrapper in _WRAPPER_PREFIXES:
            key = key.replace(wrapper, "")
        out[key.removeprefix("model.")] = value
    return out


# --------------------------------------------------------------------------------------------- files


def torch_load(path: str | Path) -> dict:
    """torch.load restricted to tensors and plain containers; anything else is refused with one clear error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it holds pickled objects other than tensors and plain containers "
            f"(loading it would run code). Convert it to safetensors on a machine you trust. ({err})"
        ) from None


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    return load_file(str(path)), metadata


def _shard_files(index_path: Path) -> list[Path]:
    """The shards an index json names, in order; one CheckpointError if any is missing."""
    weight_map = json.loads(index_path.read_text())["weight_map"]
    missing = sorted({s for s in weight_map.values() if not (index_path.parent / s).exists()})
    if missing:
        raise CheckpointError(f"{index_path} names shards that are missing: " + ", ".join(missing))
    return [index_path.parent / s for s in sorted(set(weight_map.values()))]


def _read_sharded(index_path: Path) -> dict:
    state = {}
    for shard in _shard_files(index_path):
        state.update(load_file(str(shard)))
    return state


def _pick_training_entry(obj: dict, which: str, path: Path) -> dict:
    """Self-Forcing/HiAR `.pt` dict or Lightning `.ckpt` -> one model's state dict (Wan names)."""
    if "state_dict" in obj:  # Lightning checkpoint: submodules are attributes of the LightningModule
        state = obj["state_dict"]
        prefixes = sorted({k.split(".", 1)[0] for k in state})
        auto = next((p for p in ("generator_ema", "generator", "model") if p in prefixes), "generator")
        prefix = auto if which == "auto" else which  # "model": a teacher checkpoint (its state_dict holds the EMA)
        if prefix not in prefixes:
            raise CheckpointError(f"{path}: no '{prefix}' weights in this Lightning checkpoint (has {prefixes})")
        return strip_training_prefixes({k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")})
    entries = [k for k in ("generator_ema", "generator", "critic", "model") if isinstance(obj.get(k), dict)]
    if entries:
        name = next(k for k in ("generator_ema", "generator", "model") if k in entries) if which == "auto" else which
        if name not in entries:
            raise CheckpointError(f"{path}: no '{name}' entry (has {entries})")
        return strip_training_prefixes(obj[name])
    return strip_training_prefixes(obj)  # a bare state dict saved with torch.save


def read_state_dict(source: str | Path, which: str = "auto") -> tuple[dict, WanConfig | None]:
    """Any supported file or folder -> (state dict with original Wan names, config if the source carries one)."""
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    config = None
    if path.is_dir():
        if (path / "transformer").is_dir():  # root of a diffusers release
            path = path / "transformer"
        if (path / "config.json").exists():
            config = WanConfig.from_json(path / "config.json")
        indexes = sorted(path.glob("*.safetensors.index.json"))
        singles = sorted(path.glob("*.safetensors"))
        if indexes:
            state = _read_sharded(indexes[0])
        elif len(singles) == 1:
            state, _ = _read_safetensors(singles[0])
        else:
            raise CheckpointError(f"{path}: expected one *.safetensors file or a *.safetensors.index.json")
    elif path.suffix == ".safetensors":
        state, metadata = _read_safetensors(path)
        if "config" in metadata:
            config = WanConfig.from_dict(json.loads(metadata["config"]))
        elif (path.parent / "config.json").exists():
            config = WanConfig.from_json(path.parent / "config.json")
    elif path.suffix == ".json" and path.name.endswith(".index.json"):
        state = _read_sharded(path)
        if (path.parent / "config.json").exists():
            config = WanConfig.from_json(path.parent / "config.json")
    elif path.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        obj = torch_load(path)
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
        state = _pick_training_entry(obj, which, path)
        hparams = obj.get("hyper_parameters", {})
        model_hparams = hparams.get("model_config", hparams.get("model"))  # distillation / teacher tasks
        if isinstance(model_hparams, dict):
            config = WanConfig.from_dict(model_hparams)
    else:
        raise CheckpointError(f"{path}: unsupported checkpoint type (use .safetensors, .pt, .pth, .ckpt or a folder)")
    if any(k.startswith(("condition_embedder.", "proj_out.")) for k in state):
        state = diffusers_to_wan(state)
    return state, config


# --------------------------------------------------------------------------------------------- model


def check_state_dict(model: torch.nn.Module, state_dict: dict, source: str = "checkpoint") -> None:
    """Raise one CheckpointError naming every missing key, unexpected key and shape mismatch."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {expected[k]}"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != expected[k]
    ]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not match the model; nothing was loaded."]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
            if items:
                lines.append(f"{title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise CheckpointError("\n".join(lines))


def _sharded_source(source: str | Path) -> tuple[Path, WanConfig | None] | None:
    """(index json, config) when `source` is a sharded safetensors checkpoint (a folder or its index), else None."""
    path = Path(source)
    if path.is_dir():
        if (path / "transformer").is_dir():
            path = path / "transformer"
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if not indexes:
            return None
        index = indexes[0]
    elif path.name.endswith(".safetensors.index.json"):
        index = path
    else:
        return None
    config_file = index.parent / "config.json"
    return index, (WanConfig.from_json(config_file) if config_file.exists() else None)


def _require_config(config: WanConfig | None, source) -> None:
    if config is None:
        raise CheckpointError(f"{source}: the checkpoint carries no model config; pass config= (e.g. a conf/model preset)")


def _cast(tensor: torch.Tensor, device, dtype: torch.dtype | None) -> torch.Tensor:
    """Floating tensors to `dtype` (others keep theirs), on `device`; one copy at most."""
    return tensor.to(device=device, dtype=dtype if dtype is not None and tensor.is_floating_point() else None)


def _assign(model: WanDiT, part: dict, device, dtype: torch.dtype | None) -> None:
    """Move `part` into the model in the target dtype, replacing its (meta) parameters; `part` is emptied as it goes,
    so each checkpoint tensor and its cast copy coexist one tensor at a time."""
    for key in list(part):
        part[key] = _cast(part[key], device, dtype)
    model.load_state_dict(part, strict=False, assign=True)
    part.clear()


def load_dit(
    source: str | Path,
    *,
    which: str = "auto",
    config: WanConfig | dict | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> WanDiT:
    """Build a WanDiT from any supported checkpoint. `which` picks generator_ema / generator / critic in training
    checkpoints ("auto": EMA if present). `config` is needed only when the source carries none.

    The model is built on the meta device and the checkpoint tensors are assigned to it in `dtype` (their own dtype
    when None): no randomly initialised copy, no full-size copy in another dtype. A sharded checkpoint (the 14B
    release) is read shard by shard: at most one shard's tensors are in host memory at a time."""
    if isinstance(config, dict):
        config = WanConfig.from_dict(config)
    sharded = _sharded_source(source)
    if sharded is not None:
        index, found = sharded
        config = config or found
        _require_config(config, source)
        with torch.device("meta"):
            model = WanDiT(config)
        shards = _shard_files(index)
        shapes = {}
        for shard in shards:  # names and shapes from the headers only: everything is checked before any load
            with safe_open(str(shard), framework="pt") as f:
                shapes.update({k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()})
        if any(k.startswith(("condition_embedder.", "proj_out.")) for k in shapes):
            shapes = diffusers_to_wan(shapes)
        check_state_dict(model, shapes, str(source))
        for shard in shards:
            part = load_file(str(shard))
            if any(k.startswith(("condition_embedder.", "proj_out.")) for k in part):
                part = diffusers_to_wan(part)
            _assign(model, part, device, dtype)
    else:
        state, found = read_state_dict(source, which)
        config = config or found
        _require_config(config, source)
        with torch.device("meta"):
            model = WanDiT(config)
        check_state_dict(model, state, str(source))
        _assign(model, state, device, dtype)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # check_state_dict saw every key; this guards non-persistent state a future model might add
        raise CheckpointError(f"{source}: no weights for {left[:5]}")
    return model


def save_dit(model: WanDiT, path: str | Path) -> None:
    """Our own format: safetensors with the original Wan names and the config in the metadata."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"config": json.dumps(model.cfg.to_dict())})


def export_training_checkpoint(path: str | Path, **models: torch.nn.Module | dict | None) -> None:
    """The Self-Forcing/HiAR `.pt` layout ({generator, critic, generator_ema} with `model.` keys), which the official
    inference code and `load_dit` both read. Plain tensors only, so it loads with weights_only=True."""
    out = {}
    for name, module in models.items():
        if module is None:
            continue
        state = module.state_dict() if isinstance(module, torch.nn.Module) else module
        out[name] = {"model." + k: v.detach().contiguous().cpu() for k, v in state.items()}
    # through a file object: torch names the zip records "archive/...", not after the temporary file, so equal weights
    # give equal bytes
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(out, f)
