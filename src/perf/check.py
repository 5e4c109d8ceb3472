"""`make gpu-check`: the prepared first GPU run (one H100/H200, under 8 minutes), one JSON in experiments/bench/.

1. ``bench-gpu`` at 1.3B (random bf16 weights, 832x480): 21 and 81 latent frames; block-first, step-first, wavefront;
   eager and with ``compile_blocks`` (DiT-only runs when compiled); which attention kernel ran (src.perf.gpu).
2. One real DMD iteration at 1.3B with a 1.3B teacher: peak memory per update (``torch.cuda.max_memory_allocated``)
   beside the estimator's prediction for the same overrides (``src.perf.estimate.estimate_dmd_iteration`` /
   ``measure_dmd_iteration``).
3. The attention TFLOP/s of each mode at 1.3B shapes: bidirectional, block-causal one pass (BlockMask), a cached
   steady-state block (full window; window + sinks), the fused two-block chunk; useful FLOPs only (visible keys).

Each part's failure is recorded in the JSON (``error``) and the others still run, so one run tells everything.
``--smoke`` runs all of it on CPU with tiny sizes (float32; the DMD part on a one-layer toy world via the estimator's
own CPU path).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import torch

from src.io import atomic_write_text
from src.models.attention import ChunkAttention, attention_kernel
from src.models.kv_cache import KVCache

# The estimator's overrides (src.train's): 1.3B student and critic with a 1.3B teacher, bf16, batch 1, one device.
DMD_OVERRIDES = ["experiment=hiar_fkl", "world=wan2.1_1.3b_teacher1.3b", "trainer=gpu_bf16",
                 "world.training.micro_batch_size=1"]
SMOKE_DMD_OVERRIDES = ["experiment=hiar_fkl", "world=toy", "task.num_frames=6",
                       *[f"world.{m}.num_layers=1" for m in ("student", "critic", "teacher")]]


def _attend_once(plan_args: tuple, shape: tuple, device, dtype) -> ChunkAttention:
    """One layer's self-attention of a chunk (the chunk's keys written in place when cached, not committed)."""
    plan = ChunkAttention(*plan_args)
    q = torch.randn(*shape, device=device, dtype=dtype)
    plan.attend(0, q, q, q)
    return plan


def attention_modes(smoke: bool, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    """Time ChunkAttention.attend for each mode on random q/k/v; TFLOP/s from the visible (query, key) pairs."""
    heads, head_dim = (2, 16) if smoke else (12, 128)
    tpf = 6 if smoke else 1560
    frames, window, sink = (9, 6, 3) if smoke else (21, 21, 3)
    modes = {  # name: (cache window, sink or None for no cache, start, chunk frames, frames_per_block, write)
        "bidirectional": (None, None, 0, frames, None, 0),
        "block_causal_one_pass": (None, None, 0, frames, 3, 0),
        "cached_steady_state": (window, 0, 3 * frames, 3, None, 3),
        "cached_window_and_sinks": (window, sink, 3 * frames, 3, None, 3),
        "fused_two_blocks": (window, 0, 3 * frames, 6, 3, 3),
    }
    results = {}
    for name, (win, snk, start, n, fpb, write) in modes.items():
        try:
            cache = None
            if snk is not None:  # fill the cache as a generation would, up to ``start``
                cache = KVCache(1, window=win, sink=snk)
                with torch.no_grad():
                    for s in range(0, start, 3):
                        plan = ChunkAttention(cache, s, 3, tpf, None, win, snk, 3)
                        k = torch.randn(1, 3 * tpf, heads, head_dim, device=device, dtype=dtype)
                        plan.attend(0, k, k, k)
                        plan.finish()

            shape = (1, n * tpf, heads, head_dim)
            args = (cache, start, n, tpf, fpb, win, snk or 0, write if cache else 0)
            with torch.no_grad():
                plan = _attend_once(args, shape, device, dtype)  # warm-up (compilation of flex on a GPU)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                begin = time.perf_counter()
                for _ in range(repeats):
                    _attend_once(args, shape, device, dtype)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = (time.perf_counter() - begin) / repeats
            pairs = sum((q_hi - q_lo) * tpf * sum(hi - lo for lo, hi in runs) * tpf for q_lo, q_hi, runs in plan.groups)
            flops = 4 * pairs * heads * head_dim
            probe = torch.empty(1, 1, heads, head_dim, device=device, dtype=dtype)
            results[name] = {"query_tokens": n * tpf, "visible_pairs": pairs, "flops": flops, "seconds": seconds,
                             "tflops_per_s": flops / seconds / 1e12, "calls_per_layer": len(plan.groups),
                             "path": "flex BlockMask" if len(plan.groups) > 1 and device.type == "cuda"
                             else f"unmasked {attention_kernel(probe)}",
                             "cache_mode": plan.mode}
        except Exception as e:  # noqa: BLE001 - recorded, the other modes still run
            results[name] = {"error": repr(e), "traceback": traceback.format_exc(limit=5)}
    return results


def dmd_iteration(overrides: list[str]) -> dict:
    from src.perf.estimate import estimate_dmd_iteration, measure_dmd_iteration

    out = {"overrides": overrides}
    for key, fn in (("estimated", estimate_dmd_iteration), ("measured", measure_dmd_iteration)):
        try:
            out[key] = fn(list(overrides))
        except Exception as e:  # noqa: BLE001 - recorded, the rest of the check still runs
            out[key] = {"error": repr(e), "traceback": traceback.format_exc(limit=5)}
    return out


def bench(smoke: bool, compiled: bool, out_dir: Path) -> dict:
    from src.perf import gpu as bench_gpu

    path = out_dir / f"bench_{'compile' if compiled else 'eager'}.json"
    argv = (["--out", str(path)] + (["--smoke", "--frames", "6"] if smoke else [])
            + (["--compile", "--no-end-to-end"] if compiled else []))
    try:
        return bench_gpu.main(argv)
    except Exception as e:  # noqa: BLE001 - recorded
        return {"error": repr(e), "traceback": traceback.format_exc(limit=5)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="experiments/bench", help="folder for gpu_check_<device>.json")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: checks the code path")
    p.add_argument("--dmd-overrides", nargs="*", help=f"src.train overrides of the DMD part (default {DMD_OVERRIDES})")
    p.add_argument("--skip", nargs="*", default=[], choices=["bench", "compile", "dmd", "attention"])
    a = p.parse_args(argv)
    if not a.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu-check needs a CUDA GPU; use --smoke on CPU to check the code path")
    device = torch.device("cpu" if a.smoke else "cuda")
    out_dir = Path(a.out)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))  # bench-gpu's own JSONs; their content goes in the report
    name = "cpu-smoke" if a.smoke else torch.cuda.get_device_name(device).lower().replace(" ", "-")
    report = {"machine": {"device": name, "torch": torch.__version__, "platform": platform.platform(),
                          "cuda": torch.version.cuda},
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    begin = time.perf_counter()
    parts = {
        "bench_eager": lambda: bench(a.smoke, False, scratch) if "bench" not in a.skip else None,
        "bench_compiled": lambda: bench(a.smoke, True, scratch) if "compile" not in a.skip else None,
        "attention_modes": lambda: attention_modes(a.smoke, device, torch.float32 if a.smoke else torch.bfloat16,
                                                   2 if a.smoke else 10) if "attention" not in a.skip else None,
        "dmd_iteration": lambda: dmd_iteration(a.dmd_overrides if a.dmd_overrides is not None else
                                               SMOKE_DMD_OVERRIDES if a.smoke else DMD_OVERRIDES)
        if "dmd" not in a.skip else None,
    }
    report["seconds"] = {}
    for key, fn in parts.items():
        start = time.perf_counter()
        report[key] = fn()
        report["seconds"][key] = time.perf_counter() - start
    report["seconds"]["total"] = time.perf_counter() - begin
    path = out_dir / f"gpu_check_{name}.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=2, default=str))
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
