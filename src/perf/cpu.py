"""`make bench`: CPU timings as JSON (not timed tests).

* forward time per block in each attention mode (bidirectional / block-causal one pass / KV-cached), for the toy
  preset and a larger one;
* the cost of KV-cached autoregressive generation against recomputing the whole prefix for every block (ratio);
* each sampler's frames/s and first-block latency (src/perf/sampler_bench.py);
* ``--throughput``: step-first and block-first latent frames/s at 21 and 42 frames of this tree and of an older commit
  (default efd1810, before the attention/KV-cache rework; extracted with ``git archive``), same weights, 1 and 2
  threads, compile off and on (this tree only), by experiments/bench/throughput.py in subprocesses, in ``--rounds``
  interleaved before/after rounds (median of the per-round ratios) -> experiments/bench/throughput.json. Run it under
  ``flock /tmp/hiar-cpu.lock`` on a shared machine.
* ``--fused-writes``: unfused vs fused cache writes (``SamplerConfig.fuse_writes``), block-first and step-first at 21
  and 81 frames, forwards and seconds in interleaved rounds -> experiments/bench/fused_writes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from src.models.wan import WanConfig, WanDiT
from src.perf.sampler_bench import bench_samplers

PRESETS = {
    # the toy world's DiT (conf/model/toy.yaml) on its 12x8x8 latents
    "toy": (WanConfig(dim=128, ffn_dim=512, num_heads=4, num_layers=4, in_dim=12, out_dim=12, text_len=16,
                      text_dim=64), (12, 8, 8)),
    # Wan-shaped blocks (head_dim 128, 16 latent channels) at a CPU-sized width and resolution
    "wan-small": (WanConfig(dim=512, ffn_dim=2048, num_heads=4, num_layers=4, text_len=64, text_dim=256),
                  (16, 16, 16)),
}


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


@torch.no_grad()
def bench_attention_modes(cfg: WanConfig, latent: tuple[int, int, int], num_blocks: int = 7, fpb: int = 3,
                          repeats: int = 3) -> dict:
    torch.manual_seed(0)
    model = WanDiT(cfg).eval()
    frames = num_blocks * fpb
    x = torch.randn(1, frames, *latent)
    t = torch.full((1, frames), 500.0)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim)

    def cached_generation():
        cache = model.new_cache()
        for n in range(num_blocks):
            sl = slice(n * fpb, (n + 1) * fpb)
            model(x[:, sl], t[:, sl], ctx, cache=cache, start_frame=n * fpb, write_cache=True)

    def recompute_prefix():  # no cache: every block re-runs everything before it
        for n in range(num_blocks):
            model(x[:, : (n + 1) * fpb], t[:, : (n + 1) * fpb], ctx, frames_per_block=fpb)

    bidirectional = _timed(lambda: model(x, t, ctx), repeats)
    block_causal = _timed(lambda: model(x, t, ctx, frames_per_block=fpb), repeats)
    cached = _timed(cached_generation, repeats)
    recompute = _timed(recompute_prefix, max(1, repeats // 2))
    return {
        "frames": frames,
        "tokens": frames * model.tokens_per_frame(latent[1], latent[2]),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds_per_block": {
            "bidirectional": bidirectional / num_blocks,
            "block_causal": block_causal / num_blocks,
            "kv_cached": cached / num_blocks,
        },
        "kv_cached_generation_s": cached,
        "recompute_prefix_generation_s": recompute,
        "recompute_over_cached": recompute / cached,
    }


ROOT = Path(__file__).resolve().parents[2]
THROUGHPUT_SCRIPT = ROOT / "experiments" / "bench" / "throughput.py"


def _throughput_run(code_root: Path, weights: Path, threads: int, compiled: bool) -> dict:
    cmd = [sys.executable, str(THROUGHPUT_SCRIPT), "--weights", str(weights), "--threads", str(threads)]
    cmd += ["--compile"] if compiled else []
    done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(code_root)}, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_throughput(before_commit: str, threads: tuple[int, ...] = (1, 2), rounds: int = 3) -> dict:
    """Before (``before_commit``, compile off) and after (this tree, compile off and on), same weights.

    Each round runs before, after eager and after compiled back to back per thread count, so the runs of a pair share
    the machine's load of that moment; a point's speed-up is the median over rounds of its per-round ratio, and its
    frames/s the median over rounds (each round: the best of its generations)."""
    with tempfile.TemporaryDirectory() as tmp:
        before_root = Path(tmp) / "before"
        before_root.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", before_commit, "src"], capture_output=True,
                                 check=True).stdout
        with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tar:
            tar.extractall(before_root, filter="data")
        weights = Path(tmp) / "weights.safetensors"
        runs: dict[str, list[dict]] = {}
        for _ in range(rounds):
            for t in threads:
                runs.setdefault(f"before/threads{t}", []).append(_throughput_run(before_root, weights, t, False))
                for compiled in (False, True):
                    key = f"after/threads{t}/{'compile' if compiled else 'eager'}"
                    runs.setdefault(key, []).append(_throughput_run(ROOT, weights, t, compiled))
    frames_per_s = {key: {point: statistics.median(run["results"][point]["latent_frames_per_s"] for run in key_runs)
                          for point in key_runs[0]["results"]} for key, key_runs in runs.items()}
    speedups, speedups_per_round = {}, {}
    for key, key_runs in runs.items():
        if key.startswith("after/"):
            before = runs[f"before/{key.split('/')[1]}"]
            ratios = {point: [a["results"][point]["latent_frames_per_s"] / b["results"][point]["latent_frames_per_s"]
                              for a, b in zip(key_runs, before)] for point in key_runs[0]["results"]}
            speedups_per_round[key] = ratios
            speedups[key] = {point: statistics.median(r) for point, r in ratios.items()}
    return {"before_commit": before_commit, "rounds": rounds, "latent_frames_per_s": frames_per_s,
            "speedup_over_before": speedups, "speedup_per_round": speedups_per_round, "runs": runs,
            "timing": f"{rounds} rounds; per round and point the best of 3 generations; taken while holding "
                      "/tmp/hiar-cpu.lock on a 2-core machine shared with other jobs (outliers remain possible)"}


FUSED_VARIANTS = {f"{order}{suffix}": (order, {"fuse_writes": fuse}) for order in ("block_first", "step_first")
                  for suffix, fuse in (("", False), ("_fused", True))}


def bench_fused_writes(preset: str = "wan-small", frames: tuple[int, ...] = (21, 81), rounds: int = 3,
                       threads: int = 2) -> dict:
    """Unfused vs fused cache writes (SamplerConfig.fuse_writes), block-first and step-first, same model and noise:
    forwards (counted) and wall time; ``rounds`` interleaved rounds, a point's speed-up the median per-round ratio."""
    torch.set_num_threads(threads)
    cfg, latent = PRESETS[preset]
    torch.manual_seed(0)
    model = WanDiT(cfg).eval()
    runs = {f: [bench_samplers(model, latent, f, variants=FUSED_VARIANTS) for _ in range(rounds)] for f in frames}
    out = {}
    for f, per_round in runs.items():
        for order in ("block_first", "step_first"):
            plain, fused = order, f"{order}_fused"
            ratios = [r[plain]["total_s"] / r[fused]["total_s"] for r in per_round]
            out[f"{order}/{f}"] = {
                "forwards": per_round[0][plain]["forwards"], "forwards_fused": per_round[0][fused]["forwards"],
                "tokens": per_round[0][plain]["tokens"], "tokens_fused": per_round[0][fused]["tokens"],
                "seconds": statistics.median(r[plain]["total_s"] for r in per_round),
                "seconds_fused": statistics.median(r[fused]["total_s"] for r in per_round),
                "speedup_fused": statistics.median(ratios), "speedup_per_round": ratios}
    return {"preset": preset, "model": cfg.to_dict(), "latent_shape": list(latent), "threads": threads,
            "rounds": rounds, "results": out,
            "timing": "each round runs the four variants back to back (bench_samplers: one generation each, "
                      "batch 1, default SamplerConfig); taken while holding /tmp/hiar-cpu.lock on a shared 2-core "
                      "machine"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="experiments/bench/cpu.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--throughput", action="store_true", help="only the before/after sampler throughput")
    parser.add_argument("--before-commit", default="efd1810")
    parser.add_argument("--throughput-out", default="experiments/bench/throughput.json")
    parser.add_argument("--rounds", type=int, default=3, help="before/after rounds of --throughput (median ratio)")
    parser.add_argument("--fused-writes", action="store_true", help="only unfused vs fused cache writes")
    parser.add_argument("--fused-out", default="experiments/bench/fused_writes.json")
    args = parser.parse_args(argv)
    if args.fused_writes:
        from src.io import atomic_write_text

        report = bench_fused_writes(rounds=args.rounds, threads=args.threads)
        report["machine"] = {"platform": platform.platform(), "torch": torch.__version__}
        atomic_write_text(args.fused_out, json.dumps(report, indent=2))
        print(json.dumps(report["results"], indent=2))
        return
    if args.throughput:
        from src.io import atomic_write_text

        report = bench_throughput(args.before_commit, rounds=args.rounds)
        report["machine"] = {"platform": platform.platform(), "torch": torch.__version__}
        atomic_write_text(args.throughput_out, json.dumps(report, indent=2))
        print(json.dumps(report["speedup_over_before"], indent=2))
        return
    torch.set_num_threads(args.threads)
    results = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": args.threads,
                    "torch": torch.__version__},
        "attention_modes": {name: bench_attention_modes(cfg, latent) for name, (cfg, latent) in PRESETS.items()},
    }
    results["samplers"] = {name: bench_samplers(cfg, latent) for name, (cfg, latent) in PRESETS.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
