"""The noise bank: every random tensor a sampler uses, addressed by (kind, step, block).

Each tensor is drawn from its own CPU ``torch.Generator`` seeded with a hash of (base seed, kind, step, block), in
float32, then moved to the requested device and dtype. A tensor therefore depends only on its address and shape --
not on which sampler asks, in which order, on which device or in which process -- so block-first, step-first and a
pipelined multi-process sampler that consume the same addresses consume the same noise, bit for bit.

Addresses (n = block index, j = step index 0..S-1):

* ``("init", 0, n)``      -- the pure noise block n starts from at t_0 = 1000;
* ``("renoise", j, n)``   -- the fresh noise that re-noises block n's x0 prediction of step j to t_{j+1}
                             (j < S-1; unused by the deterministic Euler variant);
* ``("context", j, n)``   -- the noise that puts block n's x0 prediction of step j at t = context_noise before it is
                             written to the cache (only when context_noise > 0).

The tensor at an address has the shape of one block for the whole batch, [B, f, C, h, w].
"""

from __future__ import annotations

import hashlib

import torch

NOISE_KINDS = ("init", "renoise", "context")


def derived_seed(*parts) -> int:
    """63 bits of sha256("part/part/..."): the one way seeds are derived (noise addresses, training draws), the same in
    every process for the same parts."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


class NoiseBank:
    def __init__(self, seed: int):
        self.seed = int(seed)

    def address_seed(self, kind: str, step: int, block: int) -> int:
        """The generator seed of one address: derived_seed(seed, kind, step, block)."""
        if kind not in NOISE_KINDS:
            raise ValueError(f"unknown noise kind {kind!r}; expected one of {NOISE_KINDS}")
        return derived_seed(self.seed, kind, int(step), int(block))

    def noise(self, kind: str, step: int, block: int, shape, device=None, dtype=torch.float32) -> torch.Tensor:
        """Drawn on the CPU (the same bits on every device and process); for a CUDA device into pinned memory and
        copied without blocking the host, so the sampler's CPU thread keeps running ahead of the GPU."""
        generator = torch.Generator(device="cpu").manual_seed(self.address_seed(kind, step, block))
        device = torch.device(device) if device is not None else torch.device("cpu")
        pinned = device.type == "cuda"
        noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32, pin_memory=pinned)
        return noise.to(device=device, dtype=dtype, non_blocking=pinned)
