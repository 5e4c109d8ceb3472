"""The toy codec: exact, invertible pixel-unshuffle plus a fixed per-channel normalisation.

pixels [B, T, 3, H, W] in [-1, 1] -> latents [B, T, 3 * f * f, H / f, W / f]; no temporal compression. Latent channel
c * f * f + k holds colour c at sub-pixel k (torch's pixel_unshuffle order). The constants are the per-colour mean and
standard deviation of the toy world's training videos (2,000 clips of 21 frames at 16x16, measured once:
mean -0.635 / -0.517 / -0.512, std 0.586 / 0.533 / 0.541; the same to 3 decimals in the wrap-around world),
rounded; they make latents roughly zero-mean unit-variance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from src.worlds.base import StreamingDecoder, VideoCodec

PIXEL_MEAN = (-0.64, -0.52, -0.51)
PIXEL_STD = (0.59, 0.53, 0.54)


class ToyCodec(VideoCodec):
    temporal_compression = 1

    def __init__(self, factor: int = 2):
        super().__init__()
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.factor = factor
        self.spatial_compression = factor
        self.latent_channels = 3 * factor * factor
        mean = torch.tensor(PIXEL_MEAN).repeat_interleave(factor * factor)
        std = torch.tensor(PIXEL_STD).repeat_interleave(factor * factor)
        self.register_buffer("mean", mean.view(-1, 1, 1), persistent=False)
        self.register_buffer("std", std.view(-1, 1, 1), persistent=False)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() != 5 or pixels.shape[2] != 3:
            raise ValueError(f"pixels must be [B, T, 3, H, W], got {tuple(pixels.shape)}")
        b, t, _, h, w = pixels.shape
        if h % self.factor or w % self.factor:
            raise ValueError(f"frame size {h}x{w} is not divisible by the codec factor {self.factor}")
        latents = F.pixel_unshuffle(pixels.reshape(b * t, 3, h, w), self.factor)
        latents = (latents - self.mean.to(latents)) / self.std.to(latents)
        return latents.view(b, t, *latents.shape[1:])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() != 5 or latents.shape[2] != self.latent_channels:
            raise ValueError(f"latents must be [B, F, {self.latent_channels}, h, w], got {tuple(latents.shape)}")
        b, f = latents.shape[:2]
        flat = latents.reshape(b * f, *latents.shape[2:]) * self.std.to(latents) + self.mean.to(latents)
        pixels = F.pixel_shuffle(flat, self.factor)
        return pixels.view(b, f, *pixels.shape[1:])

    def streaming_decoder(self) -> StreamingDecoder:
        return ToyStreamingDecoder(self)


class ToyStreamingDecoder(StreamingDecoder):
    """Each latent frame is one pixel frame, so a block decodes on its own; there is no state to carry."""

    def __init__(self, codec: ToyCodec):
        self.codec = codec

    def decode_next(self, latents: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(latents)

    def reset(self) -> None:
        """Nothing to forget."""
