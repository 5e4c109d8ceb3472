"""``compile_blocks``: torch.compile applied to a WanDiT from outside (the model itself knows nothing of compilation).

Each transformer block's elementwise work -- float32 norms, per-frame modulation, RoPE (tables computed once per
geometry, applied in float32), gates and residuals around the q/k/v, output, cross-attention and FFN matmuls -- is
compiled as two graphs per block (``pre_attention`` and ``post_attention``); the self-attention between them stays
eager, because it reads and writes the KV cache (Python bookkeeping, in-place slab writes) and picks its kernel. The
head is compiled too. Numerics are those of the eager model up to float rounding (fused kernels reassociate).
"""

from __future__ import annotations

import torch


def compile_blocks(model, **compile_kwargs):
    """Compile every block of ``model`` (a WanDiT) in place; returns the model. ``compile_kwargs`` go to torch.compile
    (e.g. ``mode="max-autotune-no-cudagraphs"`` on a GPU)."""
    for block in model.blocks:
        block.pre_attention = torch.compile(block.pre_attention, **compile_kwargs)
        block.post_attention = torch.compile(block.post_attention, **compile_kwargs)
    model.head.forward = torch.compile(model.head.forward, **compile_kwargs)
    return model
