"""Which local files the Wan world needs, and one error that lists every missing one.

Nothing is downloaded at run time: every loader reads local files only (`local_files_only=True`). A weights path is
either a single file in the original Wan2.1 release format (`Wan2.1_VAE.pth`, `models_t5_umt5-xxl-enc-bf16.pth`) or a
folder in the diffusers/transformers format (`vae/`, `text_encoder/`), with `config.json` and its weights (one file or
an index json naming shards). See docs/wan_world.md.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

DOCS = "docs/wan_world.md"


def check_files(required: Mapping[str, str | Path]) -> None:
    """Raise one FileNotFoundError naming every missing file and where it was expected (name -> path)."""
    missing = [(name, Path(path)) for name, path in required.items() if not Path(path).exists()]
    if missing:
        lines = "\n".join(f"  - {name}: expected at {path}" for name, path in missing)
        raise FileNotFoundError(
            f"{len(missing)} Wan2.1 file(s) missing (nothing is downloaded at run time; "
            f"point world.paths.wan_root / world.paths.teacher_root at your local copies, see {DOCS}):\n{lines}"
        )


def weights_files(name: str, path: str | Path, weights_name: str) -> dict[str, Path]:
    """Files that must exist for one weights path: the file itself, or a pretrained folder's config and weights.

    `weights_name` is the folder's single-file weights name without suffix (`model` for transformers,
    `diffusion_pytorch_model` for diffusers); if `<weights_name>.safetensors.index.json` exists its shards are required.
    A path ending in `.index.json` requires the index and its shards.
    """
    path = Path(path)
    if path.name.endswith(".index.json"):
        return {name: path, **_shards(name, path)}
    if path.suffix in (".pth", ".pt", ".safetensors", ".bin"):
        return {name: path}
    files = {f"{name} config": path / "config.json"}
    index = path / f"{weights_name}.safetensors.index.json"
    if index.exists():
        files[f"{name} index"] = index
        files.update(_shards(name, index))
    else:
        files[f"{name} weights"] = path / f"{weights_name}.safetensors"
    return files


def _shards(name: str, index: Path) -> dict[str, Path]:
    if not index.exists():
        return {}
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return {f"{name} shard {shard}": index.parent / shard for shard in shards}


def tokenizer_files(path: str | Path) -> dict[str, Path]:
    path = Path(path)
    return {"tokenizer config": path / "tokenizer_config.json", "tokenizer": path / "tokenizer.json"}


def world_files(world) -> dict[str, Path]:
    """Every weights file a Wan world config (`cfg.world`) points at: text encoder, tokenizer, VAE, teacher DiT and
    the 1.3B base DiT (critic / ODE init)."""
    return {
        **weights_files("text encoder", world.text_encoder.weights, "model"),
        **tokenizer_files(world.text_encoder.tokenizer),
        **weights_files("VAE", world.codec.weights, "diffusion_pytorch_model"),
        **weights_files("teacher DiT", world.teacher_checkpoint, "diffusion_pytorch_model"),
        **weights_files("critic / ODE-init DiT", world.critic_init, "diffusion_pytorch_model"),
    }


def check_world_files(world) -> None:
    """Check the whole Wan world up front, so a user sees every missing file in one error."""
    check_files(world_files(world))


def stage_files(world, stage: str) -> dict[str, Path]:
    """The files one stage reads, and only those: ode_pairs the text encoder and the ODE teacher; ode_init the text
    encoder and the base DiT it starts from; distill (the students) the text encoder, the VAE, the teacher and the
    base DiT of the critic; generate the text encoder and the VAE (its checkpoint is checked on its own)."""
    text = {**weights_files("text encoder", world.text_encoder.weights, "model"),
            **tokenizer_files(world.text_encoder.tokenizer)}
    vae = weights_files("VAE", world.codec.weights, "diffusion_pytorch_model")
    if stage == "ode_pairs":
        return {**text, **weights_files("ODE teacher DiT", world.ode_teacher_checkpoint, "diffusion_pytorch_model")}
    if stage == "ode_init":
        return {**text, **weights_files("ODE-init base DiT", world.critic_init, "diffusion_pytorch_model")}
    if stage == "distill":
        return {**text, **vae, **weights_files("teacher DiT", world.teacher_checkpoint, "diffusion_pytorch_model"),
                **weights_files("critic base DiT", world.critic_init, "diffusion_pytorch_model")}
    if stage == "generate":
        return {**text, **vae}
    raise ValueError(f"unknown stage {stage!r}: ode_pairs | ode_init | distill | generate")
