"""Measured vs predicted wall times of the sampler orders on CPU, and the predicted 4-stage speedup for Wan 1.3B.

    .venv/bin/python experiments/pipeline/run.py --out experiments/pipeline/results.json

1. Forward cost of a small random DiT on one CPU thread: forwards over q in {3, 6} frames with 0/9/21 cached frames
   and 1/2/4 batch rows (median of 7), fitted to a + rows (b q + c q k) (src.perf.timing_model).
2. Transfer time of one block latent: gloo ping-pong between two local processes (half the round trip).
3. Measured runs (one thread per process): block-first, step-first and the wavefront in this process; pipelined with
   1, 2 and 4 gloo processes, unfused (DAC) and fused; total time and first-block latency, best of --reps.
4. Predictions of the schedule model for the same runs, side by side. The machine is shared (2 cores, a training run
   and other jobs), so the speed of a forward drifts and drops when several of our processes run at once: right
   before each group of runs, every process of it times a reference forward (3 frames, 9 cached) concurrently, and
   the fitted cost is rescaled to that measured forward time ("predicted"). "replayed" runs the same schedule
   simulation with the forward durations logged in the run itself (checks the schedule alone: dependencies, overlap,
   transfers). "ideal" (JSON only) uses the fit as is, with one free core per process.
5. Wan2.1-1.3B shapes (480x832, 1560 tokens per latent frame, blocks of 3 frames, 21-frame window): predicted times
   from a FLOP count at an assumed throughput -- no GPU was available, so nothing there is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from src.distributed.launch import launch_local
from src.models.wan import WanConfig, WanDiT
from src.perf.timing_model import ForwardCost, ScheduleModel, fit_forward_cost, flop_forward_cost
from src.sampling.noise import NoiseBank
from src.sampling.orders import SamplerConfig, generate_blocks
from src.sampling.pipeline import pipeline_blocks
from src.sampling.wavefront import wavefront_blocks

BENCH = WanConfig(dim=128, ffn_dim=256, freq_dim=64, num_heads=4, num_layers=2, in_dim=4, out_dim=4, text_len=16,
                  text_dim=32)
LATENT = (4, 16, 16)  # 64 tokens per latent frame
BLOCKS = (7, 27)
WORLDS = (1, 2, 4)
# Wan2.1-1.3B on one GPU, assumed: bf16 at 400 TFLOP/s effective (~40% of an H100's dense peak), 5 ms fixed cost per
# forward, 0.1 ms to move one block latent (1.2 MB) between GPUs.
GPU_FLOPS, GPU_OVERHEAD_S, GPU_TRANSFER_S = 400e12, 5e-3, 1e-4


def bench_model() -> tuple[WanDiT, torch.Tensor]:
    torch.manual_seed(0)
    model = WanDiT(BENCH).eval()
    context = torch.randn(1, BENCH.text_len, BENCH.text_dim, generator=torch.Generator().manual_seed(1))
    return model, context


REF_Q, REF_CACHED = 3, 9  # the calibration forward


def reference_forward_s(model, context, reps: int = 10) -> float:
    """Median seconds of the reference forward now (under the current load and concurrency)."""
    cache = model.new_cache()
    times = []
    with torch.no_grad():
        model(torch.randn(1, REF_CACHED, *LATENT), torch.full((1,), 500.0), context, cache=cache, write_cache=True)
        for _ in range(reps):
            x = torch.randn(1, REF_Q, *LATENT)
            start = time.perf_counter()
            model(x, torch.full((1,), 500.0), context, cache=cache, start_frame=REF_CACHED)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def scaled(cost: ForwardCost, forward_s: float) -> ForwardCost:
    """The fitted cost rescaled so that the reference forward takes forward_s."""
    f = forward_s / cost(REF_Q, REF_CACHED + REF_Q)
    return ForwardCost(cost.a * f, cost.b * f, cost.c * f)


def measure_forward_cost(model, context, reps: int) -> tuple[ForwardCost, list]:
    samples = []
    with torch.no_grad():
        for rows in (1, 2, 4):
            ctx = context.expand(rows, -1, -1)
            for q in (3, 6):
                for cached in (0, 9, 21):
                    cache = model.new_cache()
                    if cached:
                        model(torch.randn(rows, cached, *LATENT), torch.full((rows,), 500.0), ctx, cache=cache,
                              write_cache=True)
                    times = []
                    for _ in range(reps):
                        x = torch.randn(rows, q, *LATENT)
                        start = time.perf_counter()
                        model(x, torch.full((rows,), 500.0), ctx, cache=cache, start_frame=cached)
                        times.append(time.perf_counter() - start)
                    samples.append((q, cached + q, rows, statistics.median(times)))
    return fit_forward_cost(samples), samples


def time_stream(blocks_iter, durations: list) -> dict:
    """Consume a block generator: total seconds, seconds to the first block, and the forward durations it logged."""
    start = time.perf_counter()
    first = None
    for _ in blocks_iter:
        first = first if first is not None else time.perf_counter() - start
    return {"total_s": time.perf_counter() - start, "first_block_s": first, "forward_s": list(durations)}


class TimedModel:
    """The model as the single-process samplers see it, logging each forward's duration."""

    def __init__(self, model, durations: list):
        self.model, self.durations = model, durations

    def new_cache(self, window=None, sink=0):
        return self.model.new_cache(window=window, sink=sink)

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.model(*args, **kwargs)
        self.durations.append(time.perf_counter() - start)
        return out


def _pipeline_job(rank: int, world: int, model, context, reps: int, out: str):
    results = {}
    if world == 2:  # transfer time of one block latent
        buf = torch.zeros(1, 3, *LATENT)
        trips = []
        for _ in range(20):
            dist.barrier()
            start = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            trips.append(time.perf_counter() - start)
        results["transfer_s"] = statistics.median(trips) / 2
    cfg = SamplerConfig()
    for blocks in BLOCKS:
        for fuse in (False, True):
            dist.barrier()
            runs = {"reference_forward_s": reference_forward_s(model, context), "runs": []}
            for _ in range(reps):
                trace = []
                dist.barrier()
                run = time_stream(pipeline_blocks(model, context, 3 * blocks, LATENT, cfg, NoiseBank(0), fuse=fuse,
                                                  trace=trace), [])
                run["forward_s"] = [end - start for *_, start, end in trace]
                runs["runs"].append(run)
            results[f"{blocks}_{fuse}"] = runs
    Path(f"{out}.{rank}").write_text(json.dumps(results))


def measure_pipelines(model, context, reps: int) -> tuple[dict, float]:
    """Per run: the slowest rank's total, the last rank's first block, forward durations of all ranks in rank
    order (the schedule model's program order); the best of reps by total."""
    measured, transfer = {}, None
    for world in WORLDS:
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "r")
            launch_local(world, _pipeline_job, model, context, reps, out)
            ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]
        transfer = ranks[0].get("transfer_s", transfer)
        for blocks in BLOCKS:
            for fuse in (False, True):
                key = f"{blocks}_{fuse}"
                runs = [{"total_s": max(r[key]["runs"][i]["total_s"] for r in ranks),
                         "first_block_s": ranks[-1][key]["runs"][i]["first_block_s"],
                         "forward_s": [t for r in ranks for t in r[key]["runs"][i]["forward_s"]]}
                        for i in range(reps)]
                best = min(runs, key=lambda r: r["total_s"])
                best["reference_forward_s"] = statistics.mean(r[key]["reference_forward_s"] for r in ranks)
                measured.setdefault(blocks, {})[f"pipelined_{world}" + ("_fused" if fuse else "")] = best
    return measured, transfer


def measure_single(model, context, reps: int) -> dict:
    cfg = SamplerConfig()
    out = {}
    with torch.no_grad():
        for blocks in BLOCKS:
            for name in ("block_first", "step_first", "wavefront"):
                ref = reference_forward_s(model, context)
                runs = []
                for _ in range(reps):
                    durations = []
                    if name == "wavefront":
                        trace = []
                        run = time_stream(wavefront_blocks(model, context, 3 * blocks, LATENT, cfg, NoiseBank(0),
                                                           trace=trace), [])
                        run["forward_s"] = [end - start for *_, start, end in trace]
                    else:
                        run = time_stream(generate_blocks(TimedModel(model, durations), context, 3 * blocks, LATENT,
                                                          cfg, NoiseBank(0), order=name), durations)
                    runs.append(run)
                best = min(runs, key=lambda r: r["total_s"])
                out.setdefault(blocks, {})[name] = {**best, "reference_forward_s": ref}
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="experiments/pipeline/results.json")
    p.add_argument("--reps", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(1)
    cores = os.cpu_count() or 1
    load_before = os.getloadavg()
    model, context = bench_model()
    cost, samples = measure_forward_cost(model, context, reps=7)
    single = measure_single(model, context, a.reps)
    piped, transfer = measure_pipelines(model, context, a.reps)

    cpu = {}
    for blocks in BLOCKS:
        ideal = ScheduleModel(cost, SamplerConfig(), blocks, transfer_s=transfer).all(processes=WORLDS)
        rows = {}
        for name, meas in {**single[blocks], **piped[blocks]}.items():
            order, processes = (("pipelined", int(name.split("_")[1])) if name.startswith("pipelined")
                                else (name, 1))
            fuse = name.endswith("fused")
            now = ScheduleModel(scaled(cost, meas["reference_forward_s"]), SamplerConfig(), blocks,
                                transfer_s=transfer)
            pred = now.predict(order, processes, fuse=fuse)
            replay = now.predict(order, processes, fuse=fuse, seconds=meas["forward_s"])
            rows[name] = {"measured_total_s": meas["total_s"], "predicted_total_s": pred.total_s,
                          "replayed_total_s": replay.total_s, "ideal_total_s": ideal[name]["total_s"],
                          "measured_first_block_s": meas["first_block_s"],
                          "predicted_first_block_s": pred.first_block_s,
                          "replayed_first_block_s": replay.first_block_s,
                          "reference_forward_s": meas["reference_forward_s"],
                          "mean_forward_s": statistics.mean(meas["forward_s"]), "forwards": pred.forwards}
        cpu[str(blocks)] = rows

    wan = WanConfig()
    gpu_cost = flop_forward_cost(wan, tokens_per_frame=30 * 52, flops_per_s=GPU_FLOPS, overhead_s=GPU_OVERHEAD_S)
    gpu = {}
    for blocks in BLOCKS:
        pred = ScheduleModel(gpu_cost, SamplerConfig(), blocks, transfer_s=GPU_TRANSFER_S).all(processes=(4,))
        sf = pred["step_first"]["total_s"]
        gpu[str(blocks)] = {name: {**v, "speedup_vs_step_first": sf / v["total_s"]} for name, v in pred.items()}

    results = {
        "machine": {"cpu_count": cores, "platform": platform.platform(), "torch": torch.__version__,
                    "threads_per_process": 1, "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "cpu_model": {"config": BENCH.to_dict(), "latent": LATENT, "frames_per_block": 3, "steps": 4, "window": 21},
        "forward_cost_fit": {"a_s": cost.a, "b_s_per_frame": cost.b, "c_s_per_frame2": cost.c,
                             "samples_q_k_rows_s": samples},
        "transfer_s": transfer,
        "cpu": cpu,
        "wan_1_3b_predicted": {
            "method": "FLOP count (src.perf.timing_model.forward_flops) at an assumed 400 TFLOP/s, 5 ms per forward, "
                      "0.1 ms per block transfer; no GPU measurement (none available)",
            "cost": {"a_s": gpu_cost.a, "b_s_per_frame": gpu_cost.b, "c_s_per_frame2": gpu_cost.c},
            "blocks": gpu,
        },
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1))
    for blocks, rows in cpu.items():
        print(f"CPU, {blocks} blocks: order | total s: measured predicted replayed | first block s: measured "
              "predicted replayed | reference forward ms")
        for name, r in rows.items():
            print(f"  {name:18s} {r['measured_total_s']:7.3f} {r['predicted_total_s']:7.3f} "
                  f"{r['replayed_total_s']:7.3f} | {r['measured_first_block_s']:7.3f} "
                  f"{r['predicted_first_block_s']:7.3f} {r['replayed_first_block_s']:7.3f} | "
                  f"{1000 * r['reference_forward_s']:6.1f}")
    for blocks, rows in gpu.items():
        print(f"Wan 1.3B predicted, {blocks} blocks: " + ", ".join(
            f"{k} {v['total_s']:.2f}s (x{v['speedup_vs_step_first']:.2f})" for k, v in rows.items()))


if __name__ == "__main__":
    main()
