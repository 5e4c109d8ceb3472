"""What a world provides to the rest of the framework: a frozen text encoder and a video codec.

The toy world and the Wan world implement these two interfaces; samplers, training and evaluation see nothing else.
Layouts: pixels [B, T, 3, H, W] in [-1, 1]; latents [B, F, C, h, w], normalised (roughly unit variance).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn


class TextEncoder(nn.Module, ABC):
    """Frozen: prompts -> (embeddings [B, text_len, text_dim] with padding rows zeroed, mask [B, text_len] bool)."""

    text_len: int
    text_dim: int

    @abstractmethod
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def forward(self, prompts: list[str]) -> torch.Tensor:
        return self.encode(prompts)[0]


class StreamingDecoder(ABC):
    """Decodes consecutive latent blocks of one video, carrying whatever state the codec needs across calls."""

    @abstractmethod
    def decode_next(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, f, C, h, w] (the next f latent frames) -> the pixel frames they complete [B, t, 3, H, W]."""

    @abstractmethod
    def reset(self) -> None: ...


class VideoCodec(nn.Module, ABC):
    """pixels <-> normalised latents. `temporal_compression` = pixel frames per latent frame after the first."""

    latent_channels: int
    temporal_compression: int
    spatial_compression: int

    @abstractmethod
    def encode(self, pixels: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def streaming_decoder(self) -> StreamingDecoder: ...

    def num_pixel_frames(self, num_latent_frames: int) -> int:
        """1 + 4k pixel frames for 1 + k latent frames in Wan; equal counts in the toy world."""
        if self.temporal_compression == 1:
            return num_latent_frames
        return 1 + self.temporal_compression * (num_latent_frames - 1)
