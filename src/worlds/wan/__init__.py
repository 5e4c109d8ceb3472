"""The Wan2.1 world: umT5-XXL text encoder and Wan VAE (streaming decode), from local weights (docs/wan_world.md)."""

from src.worlds.wan.paths import check_files, check_world_files
from src.worlds.wan.text import WAN_NEGATIVE_PROMPT, WanTextEncoder
from src.worlds.wan.vae import WanStreamingDecoder, WanVAE

__all__ = [
    "WAN_NEGATIVE_PROMPT",
    "WanStreamingDecoder",
    "WanTextEncoder",
    "WanVAE",
    "check_files",
    "check_world_files",
]
