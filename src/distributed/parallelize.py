"""``parallelize_dit``: everything applied to a WanDiT from outside, in one place and in one order (the model itself knows
nothing of it): per-block activation checkpointing, then torch.compile, then the strategy's sharding (FSDP2's
``fully_shard`` per block, or a DeepSpeed ZeRO engine). Every Trainer strategy (src/distributed/strategies.py) calls it
on each DiT of the LightningModule; its settings are ``ParallelizeConfig`` (conf/parallelize/).

Compile (``compile_blocks``): each transformer block's elementwise work -- float32 norms, per-frame modulation, RoPE
(tables computed once per geometry, applied in float32), gates and residuals around the q/k/v, output,
cross-attention and FFN matmuls -- is compiled as two graphs per block (``pre_attention`` and ``post_attention``);
the self-attention between them stays eager, because it reads and writes the KV cache (Python bookkeeping, in-place
slab writes) and picks its kernel. The head is compiled too. Numerics are those of the eager model up to float
rounding (fused kernels reassociate).

Activation checkpointing (``checkpoint_blocks``): each block's forward runs under non-reentrant
``torch.utils.checkpoint`` whenever grad is enabled, so only block inputs are kept and the block is recomputed in the
backward. A recompute must read the KV-cache slots its forward read (``CacheChanged`` otherwise), and a forward that
writes the cache must run without grad (a recompute would write it twice).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class ParallelizeConfig:
    """What ``parallelize_dit`` applies (conf/parallelize/default.yaml extends this schema)."""

    activation_checkpointing: bool = False  # per-block checkpointing of the trained DiTs (world.training key)
    compile: bool = False  # torch.compile each block (compile_blocks), for training and generation stages alike
    compile_kwargs: dict = field(default_factory=dict)  # passed to torch.compile, e.g. {mode: max-autotune-no-cudagraphs}

    @classmethod
    def of(cls, value) -> ParallelizeConfig:
        """A strategy's ``parallelize`` argument (the composed node, a dict, or None: the defaults) as this class."""
        if value is None or isinstance(value, cls):
            return value or cls()
        from omegaconf import OmegaConf

        return cls(**(OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else dict(value)))


def _checkpointed(forward, x, e0, text, rope, attn, layer):
    if not torch.is_grad_enabled():
        return forward(x, e0, text, rope, attn, layer)
    if getattr(attn, "write", 0):
        raise ValueError("cache writes run without grad (wrap them in torch.no_grad()): under activation checkpointing "
                         "the recompute would write the cache again")
    return checkpoint(forward, x, e0, text, rope, attn, layer, use_reentrant=False)


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """Activation checkpointing per transformer block of ``model`` (a WanDiT), in place. The block's forward is
    replaced, not the block: parameter names, state dicts and per-block sharding are unchanged."""
    for block in model.blocks:
        block.forward = functools.partial(_checkpointed, block.forward)
    return model


def is_checkpointed(model: nn.Module) -> bool:
    return all(isinstance(b.forward, functools.partial) and b.forward.func is _checkpointed for b in model.blocks)


def compile_blocks(model, **compile_kwargs):
    """Compile every block of ``model`` (a WanDiT) in place; returns the model. ``compile_kwargs`` go to torch.compile
    (e.g. ``mode="max-autotune-no-cudagraphs"`` on a GPU)."""
    for block in model.blocks:
        block.pre_attention = torch.compile(block.pre_attention, **compile_kwargs)
        block.post_attention = torch.compile(block.post_attention, **compile_kwargs)
    model.head.forward = torch.compile(model.head.forward, **compile_kwargs)
    return model


def fully_shard_dit(model: nn.Module, mesh, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: ``fully_shard`` on each transformer block, then on the model (its remaining parameters)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)


_applied: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the ParallelizeConfig applied to it


def parallelize_dit(model: nn.Module, cfg: ParallelizeConfig, shard: Callable[[nn.Module], Any] | None = None):
    """Applies to ``model`` (a WanDiT), in this order: activation checkpointing (if ``cfg.activation_checkpointing``
    and the model has trainable parameters), torch.compile (``cfg.compile``), then ``shard(model)`` (the strategy's
    FSDP2 or ZeRO wrapping; None: none). Returns what ``shard`` returns (an engine), else the model. Checkpointing
    and compile are applied once per model: a later call (a trainer's next fit or predict) with the same settings only
    shards."""
    if model not in _applied:
        if cfg.activation_checkpointing and any(p.requires_grad for p in model.parameters()):
            checkpoint_blocks(model)
        if cfg.compile:
            compile_blocks(model, **cfg.compile_kwargs)
        _applied[model] = asdict(cfg)
    elif _applied[model] != asdict(cfg):
        raise ValueError(f"this model was parallelized with {_applied[model]}, not {asdict(cfg)}")
    return shard(model) if shard is not None else model


def applied_settings(model: nn.Module) -> dict | None:
    """What ``parallelize_dit`` applied to ``model`` (its ParallelizeConfig as a dict); None if it never ran on it."""
    return _applied.get(model)
