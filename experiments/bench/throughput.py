"""Sampler throughput on CPU: step-first and block-first latent frames/s of one code tree (``make bench``).

Run by ``src.perf.cpu`` in a subprocess whose PYTHONPATH is the code tree to measure (this tree, or the code of an older
commit checked out with ``git worktree``), so "before" and "after" run the same script on the same weights (one
safetensors file, created on first use). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from src.models.wan import WanConfig, WanDiT
from src.sampling.noise import NoiseBank
from src.sampling.orders import SamplerConfig, sample

# the model of the side-by-side measurement: dim 256, 4 layers, head_dim 128, 64 tokens per latent frame
MODEL = dict(dim=256, ffn_dim=1024, num_heads=2, num_layers=4, in_dim=16, out_dim=16, text_len=64, text_dim=256)
LATENT = (16, 16, 16)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--weights", required=True, help="safetensors file of the model (written if absent)")
    p.add_argument("--frames", type=int, nargs="+", default=[21, 42])
    p.add_argument("--orders", nargs="+", default=["step_first", "block_first"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="compile each transformer block (src.distributed.parallelize)")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per point (the best is reported)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = WanDiT(WanConfig(**MODEL)).eval()
    weights = Path(a.weights)
    if weights.exists():
        model.load_state_dict(load_file(weights))
    else:
        weights.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    if a.compile:
        from src.distributed.parallelize import compile_blocks

        compile_blocks(model)
    context = torch.randn(1, MODEL["text_len"], MODEL["text_dim"], generator=torch.Generator().manual_seed(1))
    cfg = SamplerConfig()
    results = {}
    with torch.no_grad():
        for frames in a.frames:
            for order in a.orders:
                sample(model, context, 6, LATENT, cfg, NoiseBank(0), order=order)  # warm-up (and compilation)
                times = []
                for _ in range(a.repeats):
                    start = time.perf_counter()
                    sample(model, context, frames, LATENT, cfg, NoiseBank(0), order=order)
                    times.append(time.perf_counter() - start)
                results[f"{order}/{frames}"] = {"order": order, "frames": frames, "seconds": min(times),
                                                "all_seconds": times, "latent_frames_per_s": frames / min(times)}
    print(json.dumps({"threads": a.threads, "compile": a.compile, "model": MODEL, "latent": LATENT,
                      "sampler": {"steps": list(cfg.steps), "frames_per_block": cfg.frames_per_block,
                                  "window": cfg.window, "context_level": cfg.context_level},
                      "results": results}))


if __name__ == "__main__":
    main()
