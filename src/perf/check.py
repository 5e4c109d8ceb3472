"""`make gpu-check`: the prepared first GPU run, budgeted (``--budget-s``, default 420) and incremental.

``python -m src.perf check --out DIR`` runs the parts below in order of value. Every result is one printed line and
rewrites ``DIR/gpu_check.json`` atomically, so a kill at any moment leaves a valid JSON of everything measured so far
(``complete`` false until the end). A result whose estimated time does not fit in what is left of the budget is not
started (``skipped`` with the reason; the DMD process, which can be stopped, is ``stopped`` at the budget); a failure
is recorded (``error``) and the next result runs.

1. **preflight** (~30 s): versions and the GPU; which attention kernels actually ran (CUDA kernel names read from the
   profiler, for the unmasked call and for the two-piece LSE merge of sinks); one compiled flex_attention forward and
   backward at 21 frames (compile seconds apart); one bf16 forward of a 1.3B transformer block.
2. **dit**: the 1.3B DiT alone (random bf16 weights, 832x480), step-first and block-first, unfused and with fused
   cache writes (``SamplerConfig.fuse_writes``), at 21 and 81 latent frames: frames/s, MFU, peak memory, forwards.
3. **dmd**: one DMD iteration (1.3B student and critic, 1.3B teacher) in its own process, so the sampler benches'
   allocations cannot fragment its memory: ``torch.cuda.max_memory_allocated`` per update beside the estimate that
   ``python -m src.perf estimate`` computed on CPU beforehand (``experiments/bench/dmd_estimate_1.3b.json``; the
   smoke's in ``dmd_estimate_smoke.json``).
4. **compiled** (``compile_blocks``; compile seconds apart), the **wavefront**, and **end to end** with the VAE.

The compile cache (``torch.compiler.save_cache_artifacts``) is saved to ``DIR/compile_cache.bin`` after compiling and
loaded first when present, so a second run skips most compilation. At most three files are written: gpu_check.json,
dmd.json, compile_cache.bin. ``--smoke`` runs every part on CPU with tiny sizes (float32, 6 latent frames; the DMD
part on a one-layer toy world; compilation with the eager backend) to check the code path.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from src.io import atomic_write_bytes, atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
REPORT_NAME, DMD_NAME, CACHE_NAME = "gpu_check.json", "dmd.json", "compile_cache.bin"
MAX_FILE_BYTES = 16 * 2**20  # what one output file may hold where the results come back from
# The estimator's predictions, computed on CPU beforehand (`python -m src.perf estimate <overrides> --json FILE`):
# the 1.3B iteration and the smoke's one-layer toy iteration. The DMD part compares with the one of its overrides.
DMD_ESTIMATES = [ROOT / "experiments" / "bench" / name for name in ("dmd_estimate_1.3b.json", "dmd_estimate_smoke.json")]
# The estimator's overrides (src.train's): 1.3B student and critic with a 1.3B teacher, bf16, batch 1, one device.
DMD_OVERRIDES = ["experiment=hiar_fkl", "world=wan2.1_1.3b_teacher1.3b", "trainer=gpu_bf16",
                 "world.training.micro_batch_size=1"]
SMOKE_DMD_OVERRIDES = ["experiment=hiar_fkl", "world=toy", "task.num_frames=6",
                       *[f"world.{m}.num_layers=1" for m in ("student", "critic", "teacher")]]
DIT_SAMPLERS = ("step_first", "block_first", "step_first_fused", "block_first_fused")
PARTS = ("preflight", "dit", "dmd", "compiled", "wavefront", "vae")


def finite(value):
    """The value with every non-finite float replaced by None (nothing non-finite reaches the JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def summary(value: dict) -> str:
    """One line for one result."""
    for state in ("skipped", "stopped"):
        if state in value:
            return f"{state} ({value[state]})"
    if "error" in value:
        return f"ERROR {value['error'].splitlines()[0][:160]}"
    fields = [("latent_frames_per_s", "latent frames/s", "{:.2f}"), ("pixel_frames_per_s", "pixel frames/s", "{:.1f}"),
              ("mfu", "MFU", "{:.2f}"), ("forwards", "forwards", "{}"), ("peak_memory_gib", "peak GiB", "{:.1f}"),
              ("compile_s", "compile s", "{:.1f}"), ("kernel", "kernel", "{}"), ("cuda_kernels", "ran", "{}"),
              ("measured_over_estimated", "measured/estimated", "{}"), ("torch", "torch", "{}"),
              ("device_name", "device", "{}"), ("tflops_per_s", "TFLOP/s", "{:.1f}")]
    parts = []
    for key, label, fmt in fields:
        v = value.get(key)
        if v is not None:
            parts.append(f"{label} {fmt.format(v[:3] if isinstance(v, list) else v)}")
    return ", ".join(parts) or "ok"


class Report:
    """The check's JSON: rewritten atomically after every result; results start only while the budget allows."""

    def __init__(self, out_dir: Path, budget_s: float, reserve_s: float, header: dict):
        self.path, self.budget_s, self.reserve_s = out_dir / REPORT_NAME, budget_s, reserve_s
        self.start = time.perf_counter()
        self.data = {**header, "budget_s": budget_s, "complete": False, "results": {}}
        self.save()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    def save(self):
        self.data["elapsed_s"] = self.elapsed()
        atomic_write_text(self.path, json.dumps(finite(self.data), indent=2))

    def record(self, key: str, value: dict) -> dict:
        self.data["results"][key] = value
        self.save()
        print(f"[{self.elapsed():6.1f}/{self.budget_s:.0f} s] {key}: {summary(value)}", flush=True)
        return value

    def run(self, key: str, estimate_s: float, fn: Callable[[], dict | None]) -> dict:
        """Run fn unless ~estimate_s seconds no longer fit in the budget; record its result, error or skip."""
        left = self.remaining() - self.reserve_s
        if estimate_s > left:
            return self.record(key, {"skipped": f"budget: {max(left, 0):.0f} s left, needs ~{estimate_s:.0f} s"})
        start = time.perf_counter()
        try:
            value = dict(fn() or {})
        except Exception as e:  # noqa: BLE001 - recorded; the next result still runs
            value = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
            free_memory()
        value.update(seconds=time.perf_counter() - start, estimated_s=estimate_s)
        return self.record(key, value)


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------- set-up


class Setup:
    """Sizes, device and the shared DiT of one check (1.3B bf16 on CUDA; tiny float32 on CPU with --smoke)."""

    def __init__(self, smoke: bool):
        import yaml

        from src.models.wan import WanConfig
        from src.perf import gpu as bench_gpu
        from src.sampling.orders import SamplerConfig

        self.smoke = smoke
        self.device = torch.device("cpu" if smoke else "cuda")
        preset = bench_gpu.SMOKE if smoke else bench_gpu.FULL
        self.model_cfg = preset["model"] if smoke else WanConfig.from_dict(
            yaml.safe_load(bench_gpu.MODEL_PRESET.read_text()))
        self.latent_shape = preset["latent_shape"]
        self.frames = (21, 81) if not smoke else (6,)
        self.flex_frames = 21  # preflight's compiled flex forward + backward
        self.dtype = getattr(torch, preset["dtype"])
        self.vae_config = preset["vae"]
        self.sampler = SamplerConfig(window=6 if smoke else 21)  # the default sampler; a 6-frame window when tiny
        self.tpf = (self.latent_shape[1] // 2) * (self.latent_shape[2] // 2)
        self.seed = 0
        # compile_blocks' and flex's compile backend: inductor on the GPU, eager in the smoke (the path, not speed)
        self.compile_kwargs = {"backend": "eager"} if smoke else {}
        self.peak_tflops = 989.0  # H100 SXM dense bf16; the device name is recorded beside every number
        # seconds per estimated FLOP (estimated_flops), kernel-launch and Python overheads included: a guess until a
        # DiT run measures it (then the latest measurement)
        self.seconds_per_flop = 1 / 2e8 if smoke else 1 / 250e12
        self._model = None
        self.context = torch.randn(1, self.model_cfg.text_len, self.model_cfg.text_dim,
                                   generator=torch.Generator().manual_seed(self.seed)).to(self.device)

    def model(self):
        from src.models.wan import WanDiT

        if self._model is None:
            torch.manual_seed(self.seed)
            with torch.device(self.device):
                model = WanDiT(self.model_cfg)
            self._model = model.to(self.dtype).eval().requires_grad_(False)
        return self._model

    def drop_model(self):
        self._model = None
        free_memory()

    def estimate_s(self, flops: float, fixed_s: float = 2.0) -> float:
        """Seconds for ``flops`` (estimated_flops) of DiT work at the rate measured so far, with a 30% margin."""
        return 1.3 * flops * self.seconds_per_flop + fixed_s


def estimated_flops(setup: Setup, sampler: str, num_frames: int) -> int:
    """FLOPs of one generation from its forward count, each forward seeing a full window (an upper bound)."""
    from src.perf import gpu as bench_gpu

    cfg, tpf, fpb = setup.sampler, setup.tpf, setup.sampler.frames_per_block
    num_blocks = num_frames // fpb
    forwards = bench_gpu.expected_forwards(sampler, cfg, num_blocks)
    fused = sampler.endswith("fused") or sampler == "wavefront"
    chunk = (2 if fused else 1) * fpb
    keys = min(num_frames, (cfg.window or num_frames) + chunk - fpb)
    per_forward = bench_gpu.forward_flops(setup.model_cfg, 1, chunk * tpf, keys * tpf)
    return forwards * per_forward * (cfg.num_steps if sampler == "wavefront" else 1)


# --------------------------------------------------------------------------------------------- 1. preflight


def versions(setup: Setup, cache_loaded: dict) -> dict:
    from src.models.attention import attention_kernel, fa2_func, fa3_func

    info = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "fa3_available": fa3_func is not None, "fa2_available": fa2_func is not None,
            "compile_cache": cache_loaded}
    for name in ("triton", "lightning", "hydra-core", "omegaconf", "diffusers", "transformers", "numpy"):
        try:  # from the metadata: importing them all would take seconds
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:  # a missing package is a finding, not a failure
            info[name] = None
    if setup.device.type == "cuda":
        props = torch.cuda.get_device_properties(setup.device)
        info.update(device_name=torch.cuda.get_device_name(setup.device), capability=f"{props.major}.{props.minor}",
                    total_memory_gib=props.total_memory / 2**30, cudnn=torch.backends.cudnn.version(),
                    driver=_driver_version())
    else:
        info["device_name"] = "cpu (smoke)"
    probe = torch.empty(1, 1, setup.model_cfg.num_heads, setup.model_cfg.head_dim, dtype=setup.dtype,
                        device=setup.device)
    info["kernel"] = attention_kernel(probe)
    return info


def _driver_version() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], text=True,
                              capture_output=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def kernels_that_ran(fn: Callable[[], object], device: torch.device) -> list[str]:
    """Names of the device kernels (CPU: aten ops) a call ran, longest first, read from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    from torch.autograd import DeviceType

    totals: dict[str, float] = {}
    launched: dict[str, float] = {}  # fallback: non-aten names with device time, where kernels carry no device type
    for event in prof.key_averages():
        if device.type == "cuda":  # kernels on the GPU (not the CPU-side ops that launched them)
            on_device = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
            if event.key.startswith(("Memcpy", "Memset", "aten::", "cuda")) or not on_device:
                continue
            into = totals if getattr(event, "device_type", None) == DeviceType.CUDA else launched
            into[event.key] = into.get(event.key, 0.0) + on_device
        elif "attention" in event.key:
            totals[event.key] = totals.get(event.key, 0.0) + event.cpu_time_total
    totals = totals or launched
    return [name for name, _ in sorted(totals.items(), key=lambda kv: -kv[1])][:6]


def sdpa_kernels(setup: Setup) -> dict:
    """Which kernels the unmasked call (a block over a full window) and the sinks' two-piece merge ran."""
    from src.models.attention import attend_pieces, attention, attention_kernel

    heads, dim, tpf = setup.model_cfg.num_heads, setup.model_cfg.head_dim, setup.tpf
    q = torch.randn(1, 3 * tpf, heads, dim, device=setup.device, dtype=setup.dtype)
    k = torch.randn(1, 21 * tpf, heads, dim, device=setup.device, dtype=setup.dtype)
    with torch.no_grad():
        attention(q, k, k)  # warm-up
        unmasked = kernels_that_ran(lambda: attention(q, k, k), setup.device)
        pieces = [(k[:, : 3 * tpf], k[:, : 3 * tpf]), (k[:, 3 * tpf:], k[:, 3 * tpf:])]
        attend_pieces(q, pieces)
        merged = kernels_that_ran(lambda: attend_pieces(q, pieces), setup.device)
        reference = attention(q, k, k).float()
        error = (attend_pieces(q, pieces).float() - reference).abs().max().item()
    return {"kernel": attention_kernel(q), "cuda_kernels": unmasked, "sinks_merge_kernels": merged,
            "sinks_merge_max_abs_error": error,
            "sinks_merge_concatenates": any("cat" in name.lower() for name in merged)}


def flex_forward_backward(setup: Setup) -> dict:
    """One compiled flex_attention forward + backward of a block-causal pass over 21 frames (7 blocks of 3)."""
    from src.models import attention

    if setup.smoke:
        attention.FLEX_COMPILE_BACKENDS["cpu"] = "eager"
    heads, dim, tpf, frames = setup.model_cfg.num_heads, setup.model_cfg.head_dim, setup.tpf, setup.flex_frames
    visible = [[k // 3 <= f // 3 for k in range(frames)] for f in range(frames)]
    mask = attention.frame_block_mask(visible, tpf, setup.device)
    backward = setup.device.type == "cuda"  # flex_attention has no backward on CPU: the smoke runs the forward
    q, k, v = (torch.randn(1, frames * tpf, heads, dim, device=setup.device, dtype=setup.dtype,
                           requires_grad=backward) for _ in range(3))

    def step():
        out = attention.flex(q, k, v, mask)
        if backward:
            out.float().square().mean().backward()
        synchronize(setup.device)
        return out

    start = time.perf_counter()
    out = step()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    step()
    run_s = time.perf_counter() - start
    visible_pairs = sum(sum(row) for row in visible) * tpf * tpf
    flops = (3.5 if backward else 1) * 4 * visible_pairs * heads * dim  # forward 4*pairs*H*D, backward ~2.5x
    return {"compile_s": compile_s, "run_s": run_s, "tflops_per_s": flops / run_s / 1e12, "backward": backward,
            "finite": bool(torch.isfinite(out).all()), "queries": frames * tpf, "backend":
            attention.FLEX_COMPILE_BACKENDS.get(setup.device.type)}


def block_forward(setup: Setup) -> dict:
    """One forward of one transformer block of the model's width in its dtype (a block of 3 frames, no cache)."""
    from src.models.attention import ChunkAttention
    from src.models.wan import WanAttentionBlock, rope_tables

    torch.manual_seed(setup.seed)
    with torch.device(setup.device):
        block = WanAttentionBlock(setup.model_cfg).to(setup.dtype).eval()
    cfg, tpf = setup.model_cfg, setup.tpf
    x = torch.randn(1, 3 * tpf, cfg.dim, device=setup.device)
    e0 = torch.randn(1, 3, 6, cfg.dim, device=setup.device)
    text = torch.randn(1, cfg.text_len, cfg.dim, device=setup.device, dtype=setup.dtype)
    h, w = setup.latent_shape[1] // 2, setup.latent_shape[2] // 2
    rope = rope_tables(cfg.head_dim, 0, 3, h, w, setup.device)
    with torch.no_grad():
        for _ in range(2):  # the first call warms up
            start = time.perf_counter()
            out = block(x, e0, text, rope, ChunkAttention(None, 0, 3, tpf, None, None, 0), 0)
            synchronize(setup.device)
            seconds = time.perf_counter() - start
    return {"dtype": str(setup.dtype), "parameters": sum(p.numel() for p in block.parameters()), "run_s": seconds,
            "finite": bool(torch.isfinite(out).all())}


# --------------------------------------------------------------------------------------------- 2. DiT, 4. compiled


def sampler_run(setup: Setup, sampler: str, num_frames: int, warm: bool, codec=None) -> dict:
    """One timed generation (a warm-up run at the shortest length first unless ``warm``)."""
    from src.perf import gpu as bench_gpu

    model, cfg = setup.model(), setup.sampler
    warmup_s = None
    if not warm:
        start = time.perf_counter()
        bench_gpu.timed_run(sampler, model, setup.context, min(setup.frames), setup.latent_shape, cfg, setup.seed,
                            codec)
        warmup_s = time.perf_counter() - start
    run = bench_gpu.timed_run(sampler, model, setup.context, num_frames, setup.latent_shape, cfg, setup.seed, codec)
    pixel_frames = bench_gpu.pixel_frame_count(num_frames)
    num_blocks = num_frames // cfg.frames_per_block
    achieved = run["flops"] / run["total_s"]
    if codec is None:  # DiT-only runs calibrate the time estimates of later results
        setup.seconds_per_flop = run["total_s"] / estimated_flops(setup, sampler, num_frames)
    peak = run["peak_memory_bytes"]
    return {"num_latent_frames": num_frames, "num_pixel_frames": pixel_frames, "total_s": run["total_s"],
            "latent_frames_per_s": num_frames / run["total_s"], "pixel_frames_per_s": pixel_frames / run["total_s"],
            "first_block_latency_s": run["first_block_latency_s"], "forwards": run["forwards"],
            "expected_forwards": bench_gpu.expected_forwards(sampler, cfg, num_blocks), "tokens": run["tokens"],
            "flops": run["flops"], "achieved_tflops": achieved / 1e12, "mfu": achieved / (setup.peak_tflops * 1e12),
            "peak_memory_gib": peak / 2**30 if peak is not None else None, "warmup_s": warmup_s}


def dit_part(report: Report, setup: Setup):
    warmed = set()  # samplers that ran once (their first run at the shortest length warms up)
    for num_frames in setup.frames:
        for sampler in DIT_SAMPLERS:
            flops = estimated_flops(setup, sampler, num_frames)
            extra = 0 if sampler in warmed else setup.estimate_s(estimated_flops(setup, sampler, min(setup.frames)))
            result = report.run(f"dit.{num_frames}.{sampler}", setup.estimate_s(flops) + extra,
                                lambda s=sampler, f=num_frames, w=sampler in warmed: sampler_run(setup, s, f, w))
            if "forwards" in result:
                warmed.add(sampler)


def save_compile_cache(out_dir: Path) -> dict:
    """torch.compiler.save_cache_artifacts into out_dir (what a later run loads first)."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return {"saved": False, "reason": "no cache artifacts (nothing compiled by inductor)"}
    data, info = saved
    if len(data) > MAX_FILE_BYTES:
        return {"saved": False, "reason": f"{len(data)} bytes exceed the {MAX_FILE_BYTES} byte file limit"}
    atomic_write_bytes(out_dir / CACHE_NAME, data)
    return {"saved": True, "bytes": len(data), "info": str(info)[:500]}


def load_compile_cache(out_dir: Path) -> dict:
    path = out_dir / CACHE_NAME
    if not path.exists():
        return {"loaded": False}
    try:
        info = torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - a stale cache (other torch/triton/GPU) is recompiled, not fatal
        return {"loaded": False, "error": f"{type(e).__name__}: {e}"}
    return {"loaded": True, "bytes": path.stat().st_size, "info": str(info)[:500]}


def compile_model(setup: Setup, out_dir: Path) -> dict:
    """compile_blocks on the shared DiT, then one untimed step-first generation at the shortest length (compiles)."""
    from src.distributed.parallelize import compile_blocks
    from src.perf import gpu as bench_gpu

    model = compile_blocks(setup.model(), **setup.compile_kwargs)
    start = time.perf_counter()
    for sampler in ("step_first", "step_first_fused"):
        bench_gpu.timed_run(sampler, model, setup.context, min(setup.frames), setup.latent_shape, setup.sampler,
                            setup.seed, None)
    return {"compile_s": time.perf_counter() - start, "compile_kwargs": setup.compile_kwargs,
            "compile_cache": save_compile_cache(out_dir)}


def compiled_part(report: Report, setup: Setup, out_dir: Path):
    long = max(setup.frames)
    compiled = report.run("compiled.compile", 120 if not setup.smoke else 15, lambda: compile_model(setup, out_dir))
    if "compile_s" not in compiled:
        return
    for sampler in ("step_first", "block_first_fused", "step_first_fused", "block_first"):
        report.run(f"compiled.{long}.{sampler}", setup.estimate_s(estimated_flops(setup, sampler, long)),
                   lambda s=sampler: sampler_run(setup, s, long, warm=s.startswith("step_first")))


def wavefront_part(report: Report, setup: Setup):
    long = max(setup.frames)
    report.run(f"wavefront.{long}", setup.estimate_s(estimated_flops(setup, "wavefront", long)) * 1.5,
               lambda: sampler_run(setup, "wavefront", long, warm=False))


def vae_part(report: Report, setup: Setup):
    from src.perf import gpu as bench_gpu

    short = min(setup.frames)

    def end_to_end():
        codec = bench_gpu.random_vae(setup.vae_config, str(setup.dtype).removeprefix("torch."), setup.device,
                                     setup.seed)
        result = sampler_run(setup, "block_first_fused", short, warm=False, codec=codec)
        result["vae_parameters"] = sum(p.numel() for p in codec.parameters())
        return result

    flops = estimated_flops(setup, "block_first_fused", short)
    report.run(f"vae.{short}.block_first_fused", 2 * setup.estimate_s(flops) + (20 if not setup.smoke else 5),
               end_to_end)


# --------------------------------------------------------------------------------------------- 3. DMD


def dmd_worker(overrides: list[str], out_dir: Path) -> None:
    """The DMD part's own process: one measured iteration -> out_dir/dmd.json."""
    from src.perf.estimate import measure_dmd_iteration

    result = {"overrides": overrides, "measured": measure_dmd_iteration(list(overrides))}
    atomic_write_text(out_dir / DMD_NAME, json.dumps(finite(result), indent=2))


def committed_estimate(overrides: list[str]) -> tuple[Path, dict] | None:
    """The estimate committed in experiments/bench for exactly these overrides, if any: (its file, its content)."""
    for path in DMD_ESTIMATES:
        if path.exists():
            estimate = json.loads(path.read_text())
            if estimate.get("overrides") == list(overrides):
                return path, estimate
    return None


def dmd_part(report: Report, setup: Setup, out_dir: Path, overrides: list[str]):
    committed = committed_estimate(overrides)

    def run():
        estimate = committed[1]
        setup.drop_model()
        held = torch.cuda.memory_reserved() if torch.cuda.is_available() else None
        cmd = [sys.executable, "-m", "src.perf", "check", "--dmd-worker", "--out", str(out_dir),
               "--dmd-overrides", *overrides]
        timeout = max(report.remaining() - report.reserve_s, 1.0)
        (out_dir / DMD_NAME).unlink(missing_ok=True)
        try:
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"stopped": f"budget: the DMD process was stopped after {timeout:.0f} s, what was left of the budget"}
        if done.returncode != 0 or not (out_dir / DMD_NAME).exists():
            return {"error": f"the DMD process exited {done.returncode}", "stderr": done.stderr[-3000:]}
        worker = json.loads((out_dir / DMD_NAME).read_text())
        measured = worker["measured"]["updates"]
        compare = {}
        for name, update in measured.items():
            got = update.get("max_memory_allocated_gib", update.get("peak_gib"))
            want = estimate["updates"][name]["peak_gib"]
            compare[name] = {"measured_gib": got, "estimated_gib": want, "ratio": got / want if want else None,
                             "within_10_percent": abs(got / want - 1) <= 0.10 if want else None}
        return {"overrides": overrides, "estimate_source": str(committed[0].relative_to(ROOT)), "updates": compare,
                "main_process_reserved_bytes": held,
                "measured_over_estimated": [round(c["ratio"], 3) for c in compare.values() if c["ratio"]],
                "measured_with": worker["measured"].get("measured_with")}

    seconds = 150 if not setup.smoke else 25
    if committed is None:
        report.record("dmd.peak_memory", {"skipped": f"no committed estimate in experiments/bench for {overrides} "
                                          "(the estimator takes minutes of CPU: run it beforehand)"})
        return
    report.run("dmd.peak_memory", seconds, run)


# --------------------------------------------------------------------------------------------- main


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="experiments/bench/gpu_check", help="output folder (gpu_check.json, dmd.json, "
                   "compile_cache.bin)")
    p.add_argument("--budget-s", type=float, default=420.0, help="seconds the check may take (default %(default)s)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: checks the code path")
    p.add_argument("--dmd-overrides", nargs="*", help=f"src.train overrides of the DMD part (default {DMD_OVERRIDES})")
    p.add_argument("--skip", nargs="*", default=[], choices=PARTS, help="parts not to run")
    p.add_argument("--dmd-worker", action="store_true", help=argparse.SUPPRESS)  # the DMD part's own process
    a = p.parse_args(argv)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    overrides = a.dmd_overrides if a.dmd_overrides is not None else SMOKE_DMD_OVERRIDES if a.smoke else DMD_OVERRIDES
    if a.dmd_worker:
        dmd_worker(overrides, out_dir)
        return None
    if a.budget_s <= 0:
        raise SystemExit(f"--budget-s must be positive, got {a.budget_s}")
    if not a.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu-check needs a CUDA GPU; use --smoke on CPU to check the code path")
    os.environ.setdefault("WANDB_MODE", "disabled")
    cache = load_compile_cache(out_dir)
    setup = Setup(a.smoke)
    header = {"check": "src/perf/check.py", "smoke": a.smoke, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "device": "cpu (smoke)" if a.smoke else torch.cuda.get_device_name(setup.device)}
    report = Report(out_dir, a.budget_s, 3.0 if a.smoke else 15.0, header)
    if "preflight" not in a.skip:
        report.run("preflight.versions", 2, lambda: versions(setup, cache))
        report.run("preflight.sdpa_kernel", 5, lambda: sdpa_kernels(setup))
        report.run("preflight.flex_compiled", 25 if not a.smoke else 5, lambda: flex_forward_backward(setup))
        report.run("preflight.block_forward", 5 if not a.smoke else 2, lambda: block_forward(setup))
    if "dit" not in a.skip:
        dit_part(report, setup)
    if "dmd" not in a.skip:
        dmd_part(report, setup, out_dir, overrides)
    if "compiled" not in a.skip:
        compiled_part(report, setup, out_dir)
    setup.drop_model()  # the wavefront and the VAE run eager
    if "wavefront" not in a.skip:
        wavefront_part(report, setup)
    if "vae" not in a.skip:
        vae_part(report, setup)
    report.data["complete"] = True
    report.save()
    print(f"wrote {report.path} ({report.elapsed():.0f} s of {a.budget_s:.0f})")
    return report.data


if __name__ == "__main__":
    main()
