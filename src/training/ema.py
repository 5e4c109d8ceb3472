"""The generator's exponential moving average: an fp32 shadow of the fp32 master weights, optionally in host memory.

It is not a submodule of the LightningModule, so Lightning never moves it to the GPU nor casts it to the training
dtype, and no strategy wraps or shards it. It reads the master weights through `master_parameters`: the parameters
themselves under one device / ddp (fp32 under the bf16-mixed policy), DeepSpeed's fp32 partitions gathered one tensor
at a time, FSDP2's sharded fp32 DTensors gathered one tensor at a time. A bf16 shadow would not follow the weights at
lr 2e-6 and decay 0.99: most updates round away (gpu_notes.md).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from src.models.wan import WanDiT


def master_parameters(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full fp32 master value) of every parameter, one at a time. Collective under DeepSpeed ZeRO and FSDP2:
    every rank must iterate it."""
    for name, p in module.named_parameters():
        if hasattr(p, "_hp_mapping") or hasattr(p, "ds_id"):  # a DeepSpeed ZeRO engine's parameter
            from deepspeed.utils import safe_get_full_fp32_param

            value = safe_get_full_fp32_param(p)
        elif hasattr(p, "full_tensor"):  # an FSDP2 DTensor shard
            value = p.full_tensor()
        else:
            value = p
        yield name, value.detach().float()


class GeneratorEMA:
    """shadow <- decay * shadow + (1 - decay) * master, in float32 on `device` (None: the master weights' device)."""

    def __init__(self, module: nn.Module, decay: float, device: str | torch.device | None = None):
        self.decay, self.device = float(decay), device
        self.shadow = {name: value.to(device=device or value.device, copy=True)
                       for name, value in master_parameters(module)}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for name, value in master_parameters(module):
            shadow = self.shadow[name]
            shadow.lerp_(value.to(shadow.device), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().cpu() for name, t in self.shadow.items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], decay: float, device=None) -> GeneratorEMA:
        ema = cls.__new__(cls)
        ema.decay, ema.device = float(decay), device
        ema.shadow = {name: t.to(device=device, dtype=torch.float32) for name, t in state.items()}
        return ema

    def module(self, like: WanDiT, device=None) -> WanDiT:
        """A WanDiT holding the averaged weights (shared with the shadow when already on `device`)."""
        with torch.device("meta"):
            model = WanDiT(like.cfg)
        device = device or next(iter(self.shadow.values())).device
        model.load_state_dict({k: v.to(device) for k, v in self.shadow.items()}, strict=True, assign=True)
        return model.requires_grad_(False).eval()
