"""FLOPs and bytes moved per DiT forward at 1.3B (832x480, bf16), counted on fake tensors for one code tree.

Run with PYTHONPATH set to the tree to measure (this one, or an older commit extracted with ``git archive``); prints
JSON. Every aten op of the forward is seen by a dispatch mode under ``FakeTensorMode`` (no storage, no compute):
FLOPs from ``torch.utils.flop_counter.FlopCounterMode``, bytes as the sum of each op's input and output tensor sizes
(what an eager, unfused kernel reads and writes; views count zero), split into matmul/attention ops and the rest
(elementwise, norms, RoPE, copies, masks). Modes: a cached steady-state block forward with a full 21-frame window
(denoise, no write; and a write forward), the one-pass block-causal 21-frame forward, the fused two-block chunk.

    PYTHONPATH=<tree> python experiments/bench/forward_costs.py > costs_<tree>.json
    python experiments/bench/forward_costs.py --combine costs_before.json costs_after.json > forward_costs.json
"""

from __future__ import annotations

import json
import time

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

from src.models.wan import WanConfig, WanDiT

COMPUTE_OPS = {"mm", "addmm", "bmm", "baddbmm", "convolution", "linear", "flex_attention", "scaled_dot_product_attention",
               "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
               "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
               "_scaled_dot_product_attention_math"}
VIEW_OPS = {"view", "expand", "transpose", "permute", "unsqueeze", "squeeze", "slice", "select", "alias", "unbind",
            "split", "split_with_sizes", "t", "_unsafe_view", "as_strided", "detach", "unflatten", "flatten", "reshape",
            "_reshape_alias"}


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_flash_attention_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """The CPU SDPA kernel (what fake tensors dispatch to here) counted like the GPU flash kernels."""
    return sdpa_flop_count(query, key, value)  # shapes (the counter passes shapes, not tensors)


class Bytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.compute = self.other = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.namespace == "prim" or name in VIEW_OPS:  # metadata queries and views move nothing
            return out
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(a, torch.Tensor)]
        moved = sum(t.numel() * t.element_size() for t in tensors)
        if name in COMPUTE_OPS:
            self.compute += moved
        else:
            self.other += moved
        return out


def measure(fn) -> dict:
    with FlopCounterMode(display=False) as flops, Bytes() as moved:
        fn()
    return {"flops": flops.get_total_flops(), "bytes_matmul_attention": moved.compute, "bytes_other": moved.other}


PEAK_FLOPS = 989e12  # H100 SXM dense bf16
BANDWIDTH = 3.35e12  # H100 SXM HBM3, bytes/s


def combine(before: dict, after: dict) -> dict:
    """Before/after per mode, with a roofline prediction for an H100: compute floor = FLOPs / peak; the non-matmul
    bytes (eager kernels, not overlapped with the matmuls) add bytes / bandwidth; fraction = floor / (floor + that)."""
    table = {}
    for mode in after["results"]:
        row = {}
        for name, run in (("before", before), ("after", after)):
            r = run["results"][mode]
            floor = r["flops"] / PEAK_FLOPS
            other = r["bytes_other"] / BANDWIDTH
            row[name] = {**r, "compute_floor_ms": floor * 1e3, "non_matmul_traffic_ms": other * 1e3,
                         "predicted_fraction_of_floor": floor / (floor + other)}
        table[mode] = row
    return {"peak_flops": PEAK_FLOPS, "bandwidth_bytes_per_s": BANDWIDTH, "modes": table}


def _host_visibility(wan):
    """For code trees whose forward decides visibility with a host sync (``bool(visible.all())``, before the rework):
    compute ``frame_visibility`` on real CPU tensors from the frames the caller is known to use (a fake tensor has no
    values), so the forward runs on fake tensors; the [L, L] mask it then builds is real and counted like any op."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    real = wan.frame_visibility
    state = {"cache": None}

    def visibility(query_frames, key_frames, chunk_start, chunk_len, frames_per_block, window, sink):
        cache = state["cache"]
        context = cache.context_frames(chunk_start) if cache is not None else []
        with unset_fake_temporarily():
            query = torch.arange(chunk_start, chunk_start + chunk_len)
            keys = torch.cat([torch.tensor(context, dtype=torch.long), query])
            visible = real(query, keys, chunk_start, chunk_len, frames_per_block, window, sink)
            state["all_visible"] = bool(visible.all())
        return visible

    wan.frame_visibility = visibility
    wan.bool = lambda tensor: state["all_visible"]  # the forward's only bool(): bool(visible.all())
    return state


def main():
    import sys

    if len(sys.argv) == 4 and sys.argv[1] == "--combine":
        before, after = (json.loads(open(f).read()) for f in sys.argv[2:4])
        print(json.dumps(combine(before, after), indent=2))
        return
    start = time.perf_counter()
    dtype = torch.bfloat16
    import src.models.wan as wan

    host = _host_visibility(wan) if not hasattr(wan, "ChunkAttention") else {"cache": None}
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        torch.set_default_dtype(dtype)
        model = WanDiT(WanConfig()).eval()
        torch.set_default_dtype(torch.float32)
        frames = torch.randn(1, 27, 16, 60, 104, dtype=dtype)
        t = torch.full((1, 27), 500.0)
        ctx = torch.randn(1, 512, 4096, dtype=dtype)
        cache = host["cache"] = model.new_cache(window=21)
        for s in range(0, 24, 3):  # a full window: frames 3..23 after the write of block 7
            model(frames[:, s:s + 3], t[:, s:s + 3], ctx, cache=cache, start_frame=s, write_cache=True)
        results = {
            "cached_denoise_full_window": measure(lambda: model(frames[:, 24:27], t[:, 24:27], ctx, cache=cache,
                                                                start_frame=24)),
            "fused_two_blocks": measure(lambda: model(frames[:, 21:27], t[:, 21:27], ctx, cache=cache,
                                                      start_frame=21, frames_per_block=3, write_cache=3)),
            "cached_write_full_window": measure(lambda: model(frames[:, 24:27], t[:, 24:27], ctx, cache=cache,
                                                              start_frame=24, write_cache=True)),
        }
        host["cache"] = None
        results["block_causal_one_pass_21"] = measure(lambda: model(frames[:, :21], t[:, :21], ctx, frames_per_block=3))
    print(json.dumps({"model": "Wan2.1-T2V-1.3B, 832x480 (1560 tokens per latent frame), bf16 weights",
                      "results": results, "seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
