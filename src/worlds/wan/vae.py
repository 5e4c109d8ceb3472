"""The Wan2.1 VAE through diffusers `AutoencoderKLWan`, with our latent normalisation and a streaming decoder.

Weights come from Wan's `Wan2.1_VAE.pth` (names converted, see convert.py) or from a diffusers `vae/` folder.
Layouts: our pixels [B, T, 3, H, W] in [-1, 1] and latents [B, F, C, h, w]; diffusers works in [B, C, F, H, W].
Latents are normalised per channel with the published Wan2.1 statistics, z = (mu - mean) / std (diffusers keeps them in
its config but does not apply them); encode takes the posterior mean (`latent_dist.mode()`), as Wan's `encode`.
1 + 4k pixel frames <-> 1 + k latent frames; 8x spatial compression.

Streaming: diffusers decodes one latent frame at a time, carrying a causal feature cache (the last frames seen by every
causal conv) through the frames of one call and clearing it afterwards. `WanStreamingDecoder` keeps its own cache list
across calls instead, so decoding a video block by block gives the same frames as decoding it in one go: the first
latent frame gives 1 pixel frame, each later one 4.
"""

from __future__ import annotations

from pathlib import Path

import torch

from src.worlds.base import StreamingDecoder, VideoCodec
from src.worlds.wan.convert import load_exact, load_original, torch_dtype, vae_original_to_diffusers
from src.worlds.wan.paths import check_files, weights_files

# wan21.md §5 (Wan2.1 `vae.py`; the same lists are diffusers' `latents_mean` / `latents_std` defaults)
WAN21_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
WAN21_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip
# the architecture of `Wan2.1_VAE.pth` (base dim 96, z 16, 4x time, 8x space)
WAN21_VAE_CONFIG = dict(
    base_dim=96,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    latents_mean=WAN21_LATENTS_MEAN,
    latents_std=WAN21_LATENTS_STD,
)


def load_autoencoder(weights: str | Path, dtype: torch.dtype, original_config: dict | None = None):
    """A frozen `AutoencoderKLWan` from `Wan2.1_VAE.pth` (architecture `original_config`, default Wan2.1's) or from a
    diffusers folder (architecture from its config.json)."""
    from diffusers import AutoencoderKLWan

    path = Path(weights)
    if path.is_dir():
        if original_config is not None:
            raise ValueError(f"{path} is a diffusers folder with its own config.json; original_config is only for .pth")
        vae = AutoencoderKLWan.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype)
    else:
        config = dict(WAN21_VAE_CONFIG if original_config is None else original_config)
        if config.get("attn_scales"):
            raise ValueError("attn_scales must be empty: diffusers' Wan decoder has no attention in its up blocks")
        state = vae_original_to_diffusers(load_original(path), config.get("num_res_blocks", 2), str(path))
        with torch.device("meta"):
            vae = AutoencoderKLWan(**config)
        load_exact(vae, state, str(path))
        vae.to(dtype)
    return vae.eval().requires_grad_(False)


class WanVAE(VideoCodec):
    def __init__(self, weights: str | Path, dtype: str = "bfloat16", original_config: dict | None = None):
        super().__init__()
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        check_files(weights_files("VAE", weights, "diffusion_pytorch_model"))
        self.vae = load_autoencoder(weights, torch_dtype(dtype), original_config)
        cfg = self.vae.config
        if cfg.is_residual or cfg.patch_size is not None:
            raise ValueError(f"{weights}: a Wan2.2-style VAE (residual / patchified); this world expects Wan2.1's")
        self.latent_channels = cfg.z_dim
        self.temporal_compression = 2 ** sum(cfg.temperal_downsample)
        self.spatial_compression = 2 ** (len(cfg.dim_mult) - 1)
        self.num_decoder_convs = sum(isinstance(m, WanCausalConv3d) for m in self.vae.decoder.modules())
        self.register_buffer("latents_mean", torch.tensor(cfg.latents_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("latents_std", torch.tensor(cfg.latents_std, dtype=torch.float32), persistent=False)
        if self.latents_mean.numel() != cfg.z_dim or self.latents_std.numel() != cfg.z_dim:
            raise ValueError(f"{weights}: latents_mean / latents_std must have z_dim={cfg.z_dim} entries")

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def _stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.latents_mean.view(1, -1, 1, 1, 1), self.latents_std.view(1, -1, 1, 1, 1)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 1 + 4k, 3, H, W] in [-1, 1] -> normalised latents [B, 1 + k, C, H/8, W/8] (float32)."""
        if pixels.ndim != 5 or pixels.shape[2] != 3:
            raise ValueError(f"expected pixels [B, T, 3, H, W], got {tuple(pixels.shape)}")
        t, s = self.temporal_compression, self.spatial_compression
        if (pixels.shape[1] - 1) % t or pixels.shape[3] % s or pixels.shape[4] % s:
            raise ValueError(f"pixels {tuple(pixels.shape)}: need 1 + {t}k frames and height, width divisible by {s}")
        mu = self.vae.encode(pixels.transpose(1, 2).to(self.dtype)).latent_dist.mode()
        mean, std = self._stats()
        return ((mu.float() - mean) / std).transpose(1, 2)

    def to_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """normalised [B, F, C, h, w] -> the VAE's own latents [B, C, F, h, w] in its dtype."""
        if latents.ndim != 5 or latents.shape[2] != self.latent_channels:
            raise ValueError(f"expected latents [B, F, {self.latent_channels}, h, w], got {tuple(latents.shape)}")
        mean, std = self._stats()
        return (latents.transpose(1, 2).float() * std + mean).to(self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """normalised latents [B, F, C, h, w] -> pixels [B, 1 + 4(F-1), 3, 8h, 8w] in [-1, 1] (float32)."""
        return self.vae.decode(self.to_vae_latents(latents)).sample.float().transpose(1, 2)

    def streaming_decoder(self) -> WanStreamingDecoder:
        return WanStreamingDecoder(self)


class WanStreamingDecoder(StreamingDecoder):
    """Decodes one video block by block; the causal feature cache lives here, between calls, until `reset()`."""

    def __init__(self, codec: WanVAE):
        self.codec = codec
        self.reset()

    def reset(self) -> None:
        self._feat_cache: list = [None] * self.codec.num_decoder_convs
        self._frames_done = 0
        self._shape: tuple | None = None

    @torch.no_grad()
    def decode_next(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, f, C, h, w] (the next f frames) -> [B, t, 3, H, W]; t = 1 + 4(f-1) on the first call, else 4f."""
        shape = (latents.shape[0], *latents.shape[2:])
        if self._shape is not None and shape != self._shape:
            raise ValueError(
                f"decode_next got latents {tuple(latents.shape)} after {self._shape} (batch, C, h, w); "
                "call reset() before decoding another video"
            )
        self._shape = shape
        vae = self.codec.vae
        x = vae.post_quant_conv(self.codec.to_vae_latents(latents))  # a 1x1x1 conv: frames are independent
        frames = []
        for i in range(x.shape[2]):
            frames.append(
                vae.decoder(
                    x[:, :, i : i + 1],
                    feat_cache=self._feat_cache,
                    feat_idx=[0],
                    first_chunk=self._frames_done == 0,
                )
            )
            self._frames_done += 1
        return torch.cat(frames, dim=2).clamp(-1.0, 1.0).float().transpose(1, 2)
