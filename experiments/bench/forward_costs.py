"""FLOPs and bytes moved per DiT forward at 1.3B (832x480, bf16), counted on fake tensors for one code tree.

Run with PYTHONPATH set to the tree to measure (this one, or an older commit extracted with ``git archive``); prints
JSON. Every aten op of the forward is seen by a dispatch mode under ``FakeTensorMode`` (no storage, no compute):
FLOPs from ``torch.utils.flop_counter.FlopCounterMode``, bytes as the sum of each op's input and output tensor sizes
(what an eager, unfused kernel reads and writes; views count zero), split into matmul/attention ops and the rest
(elementwise, norms, RoPE, copies, masks). Modes: a cached steady-state block forward with a full 21-frame window
(denoise, no write; and a write forward), the one-pass block-causal 21-frame forward, the fused two-block chunk.
"""

from __future__ import annotations

import json
import time

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from src.models.wan import WanConfig, WanDiT

COMPUTE_OPS = ("mm", "addmm", "bmm", "baddbmm", "convolution", "scaled_dot_product", "flex_attention", "linear")
VIEW_OPS = ("view", "expand", "transpose", "permute", "unsqueeze", "squeeze", "slice", "select", "alias", "unbind",
            "split", "t.default", "_unsafe_view", "as_strided", "detach", "unflatten", "flatten", "reshape")


class Bytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.compute = self.other = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if any(v in name for v in VIEW_OPS):
            return out
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(a, torch.Tensor)]
        moved = sum(t.numel() * t.element_size() for t in tensors)
        if any(c in name for c in COMPUTE_OPS):
            self.compute += moved
        else:
            self.other += moved
        return out


def measure(fn) -> dict:
    with FlopCounterMode(display=False) as flops, Bytes() as moved:
        fn()
    return {"flops": flops.get_total_flops(), "bytes_matmul_attention": moved.compute, "bytes_other": moved.other}


def main():
    start = time.perf_counter()
    dtype = torch.bfloat16
    with FakeTensorMode(), torch.no_grad():
        torch.set_default_dtype(dtype)
        model = WanDiT(WanConfig()).eval()
        torch.set_default_dtype(torch.float32)
        frames = torch.randn(1, 27, 16, 60, 104, dtype=dtype)
        t = torch.full((1, 27), 500.0)
        ctx = torch.randn(1, 512, 4096, dtype=dtype)
        cache = model.new_cache(window=21)
        for s in range(0, 24, 3):  # a full window: frames 3..23 after the write of block 7
            model(frames[:, s:s + 3], t[:, s:s + 3], ctx, cache=cache, start_frame=s, write_cache=True)
        results = {
            "cached_denoise_full_window": measure(lambda: model(frames[:, 24:27], t[:, 24:27], ctx, cache=cache,
                                                                start_frame=24)),
            "fused_two_blocks": measure(lambda: model(frames[:, 21:27], t[:, 21:27], ctx, cache=cache,
                                                      start_frame=21, frames_per_block=3, write_cache=3)),
            "cached_write_full_window": measure(lambda: model(frames[:, 24:27], t[:, 24:27], ctx, cache=cache,
                                                              start_frame=24, write_cache=True)),
            "block_causal_one_pass_21": measure(lambda: model(frames[:, :21], t[:, :21], ctx, frames_per_block=3)),
        }
    print(json.dumps({"model": "Wan2.1-T2V-1.3B, 832x480 (1560 tokens per latent frame), bf16 weights",
                      "results": results, "seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
