"""Streaming generation: decoded blocks as soon as they are final, with prompts switching between blocks.

Block-first orders finalise block n after its S steps, so the first block arrives after S forwards; step-first orders
finalise blocks during their last step, so the first block arrives after (S-1)(2N-1) + 1 forwards.

Prompt switching: pass ``context`` as a schedule {start_block: embeddings}. Block n runs under the prompt whose start
is the latest <= n; when the prompt changes at block n, the cached frames that block n may read are rebuilt under the
new prompt first (KV recache, as LongLive does) -- one block-causal forward per contiguous run of cached frames over
exactly the latents they were written from, at their timesteps -- so the new prompt also governs the context.

Continuation: ``prefix`` (clean latents of whole blocks, src/continuation.py) are the first blocks; they are yielded
(and decoded, which also primes a causal decoder) before any sampling, and the sampler continues after them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from src.sampling.noise import NoiseBank
from src.sampling.orders import SamplerConfig, generate_blocks


class BlockDecoder(Protocol):
    """Decodes consecutive latent blocks of one video (a world's codec provides one, ``src.worlds.base``)."""

    def decode_next(self, latents: torch.Tensor) -> torch.Tensor: ...


class StreamingCodec(Protocol):
    def streaming_decoder(self) -> BlockDecoder: ...


@dataclass
class StreamedBlock:
    index: int  # block index n (latent frames n*f .. n*f + f - 1)
    latents: torch.Tensor  # [B, f, C, h, w]
    pixels: torch.Tensor | None  # [B, t, 3, H, W] in [-1, 1], the pixel frames this block completes (with a codec)
    given: bool = False  # a block of the given frames (prefix), not sampled


def stream(model, context: torch.Tensor | Mapping[int, torch.Tensor], num_frames: int, latent_shape: Sequence[int],
           cfg: SamplerConfig, bank: NoiseBank, *, order: str | None = None, codec: StreamingCodec | None = None,
           progress: Callable[[int, int], None] | None = None,
           prefix: torch.Tensor | None = None) -> Iterator[StreamedBlock]:
    """Yield each block as soon as it is final, decoded with the codec's streaming decoder when one is given."""
    decoder = codec.streaming_decoder() if codec is not None else None
    given = 0 if prefix is None else prefix.shape[1] // cfg.frames_per_block
    for n, x0 in generate_blocks(model, context, num_frames, latent_shape, cfg, bank, order=order, progress=progress,
                                 prefix=prefix):
        if decoder is None:
            yield StreamedBlock(n, x0, None, n < given)
            continue
        with torch.no_grad():
            pixels = decoder.decode_next(x0)
        yield StreamedBlock(n, x0, pixels, n < given)
