"""`make bench-gpu`'s code path on CPU (--smoke): every metric for every sampler, and the counted forwards."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from src.perf import gpu as bench_gpu
from src.sampling.orders import SamplerConfig, forward_count

ROOT = Path(__file__).resolve().parents[2]

DIT_METRICS = {"total_s", "latent_frames_per_s", "pixel_frames_per_s", "first_block_latency_s", "peak_memory_bytes",
               "flops", "achieved_tflops", "mfu"}
E2E_METRICS = {"total_s", "latent_frames_per_s", "pixel_frames_per_s", "first_block_latency_s", "peak_memory_bytes"}


def test_smoke_report(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "smoke.json"
    bench_gpu.main(["--smoke", "--out", str(out)])
    report = json.loads(out.read_text())

    setup = report["setup"]
    assert setup["smoke"] and setup["dtype"] == "float32" and "2*B*Lq*P" in setup["flops_formula"]
    assert report["machine"]["torch"] == torch.__version__
    cfg = SamplerConfig()
    model_cfg = bench_gpu.SMOKE["model"]
    tpf = setup["tokens_per_frame"]
    assert set(report["results"]) == {"6", "9"}
    for frames, by_sampler in report["results"].items():
        frames = int(frames)
        num_blocks = frames // cfg.frames_per_block
        assert set(by_sampler) == set(bench_gpu.SAMPLERS)
        for sampler, r in by_sampler.items():
            assert set(r["dit"]) == DIT_METRICS and set(r["end_to_end"]) == E2E_METRICS
            for part in ("dit", "end_to_end"):
                m = r[part]
                assert m["total_s"] > 0 and m["latent_frames_per_s"] > 0 and m["pixel_frames_per_s"] > 0
                assert 0 < m["first_block_latency_s"] <= m["total_s"]
                assert m["peak_memory_bytes"] is None  # CPU: no allocator statistics
            assert r["num_pixel_frames"] == 1 + 4 * (frames - 1)
            assert r["dit"]["flops"] > 0 and r["dit"]["mfu"] > 0
            if sampler == "wavefront":  # one batched forward per tick; each cell a 2-block chunk (context + block)
                assert r["forwards"] == r["expected_forwards"] == num_blocks + cfg.num_steps - 1
                assert r["tokens"] == num_blocks * cfg.num_steps * 2 * cfg.frames_per_block * tpf
            elif sampler.endswith("_fused"):  # N*S forwards; every one but block 0's first carries a 2-block chunk
                fused_cfg = bench_gpu.variant_config(sampler, cfg)
                assert r["forwards"] == r["expected_forwards"] == forward_count(fused_cfg, num_blocks)
                assert r["forwards"] == num_blocks * cfg.num_steps
                fused = (num_blocks - 1) * (1 if sampler.startswith("block") else cfg.num_steps)
                assert r["tokens"] == (r["forwards"] + fused) * cfg.frames_per_block * tpf
            else:
                assert r["forwards"] == r["expected_forwards"] == forward_count(cfg.with_order(sampler), num_blocks)
                assert r["tokens"] == r["forwards"] * cfg.frames_per_block * tpf
                # block n's forwards (denoise, and the write unless n is last) see n cached blocks plus itself;
                # block-first denoises S times and writes once per block, step-first does both at every step
                block = cfg.frames_per_block * tpf
                chunk = [bench_gpu.forward_flops(model_cfg, 1, block, (n + 1) * block) for n in range(num_blocks)]
                per_pass = sum(chunk) + sum(chunk[:-1])
                expected = (cfg.num_steps - 1) * sum(chunk) + per_pass if sampler == "block_first" else \
                    cfg.num_steps * per_pass
                assert r["dit"]["flops"] == expected


def test_flops_formula():
    cfg = bench_gpu.WanConfig()  # the 1.3B shape
    assert bench_gpu.matmul_params_per_token(cfg) == 30 * (6 * 1536**2 + 2 * 1536 * 8960) + 2 * 1536 * 64
    lq = 3 * 1560
    attn = 30 * 4 * lq * (lq + 512) * 1536
    assert bench_gpu.forward_flops(cfg, 1, lq, lq) == 2 * lq * bench_gpu.matmul_params_per_token(cfg) + attn
    assert bench_gpu.forward_flops(cfg, 2, lq, 2 * lq) > 2 * bench_gpu.forward_flops(cfg, 1, lq, lq)


CHECK = [sys.executable, "-m", "src.perf", "check", "--smoke", "--budget-s", "60"]


def test_gpu_check_smoke_within_its_budget(tmp_path):
    """`make gpu-check`'s code path on CPU: every part, one printed line per result, the JSON complete and valid, the
    whole run inside its 60 s budget (plus the interpreter's start)."""
    start = time.perf_counter()
    done = subprocess.run([*CHECK, "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=180)
    wall = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    results = report["results"]
    assert report["complete"] and report["smoke"] and report["elapsed_s"] <= 60 and wall <= 75
    lines = [line for line in done.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == len(results)  # one printed line per result
    for key, value in results.items():
        assert "error" not in value, (key, value)
        assert "skipped" in value or value["seconds"] >= 0  # "stopped": the DMD process at the budget
    assert {"preflight.versions", "preflight.sdpa_kernel", "preflight.flex_compiled", "preflight.block_forward",
            "dit.6.step_first"} <= set(results)
    assert results["preflight.sdpa_kernel"]["kernel"] == "sdpa"
    assert any("flash_attention" in name for name in results["preflight.sdpa_kernel"]["cuda_kernels"])
    assert results["preflight.sdpa_kernel"]["sinks_merge_max_abs_error"] < 1e-5  # float32 LSE merge
    assert results["preflight.flex_compiled"]["finite"] and results["preflight.flex_compiled"]["compile_s"] > 0
    dit = results["dit.6.step_first"]
    assert dit["forwards"] == dit["expected_forwards"] and dit["latent_frames_per_s"] > 0
    if "skipped" not in results.get("dit.6.block_first_fused", {"skipped": ""}):
        fused, plain = results["dit.6.block_first_fused"], results["dit.6.block_first"]
        assert fused["forwards"] == 2 * 4 and plain["forwards"] == 2 * 5 - 1  # N*S vs N(S+1)-1, N = 2, S = 4
    dmd = results.get("dmd.peak_memory")
    if dmd is not None and "skipped" not in dmd and "stopped" not in dmd:
        assert set(dmd["updates"]) == {"generator", "critic"}
        assert all(u["measured_gib"] > 0 and u["estimated_gib"] > 0 for u in dmd["updates"].values())
    assert len(list(tmp_path.iterdir())) <= 8 and all(f.stat().st_size <= 16 * 2**20 for f in tmp_path.iterdir())


def test_gpu_check_smoke_compiled_wavefront_vae(tmp_path):
    """The later parts' code path (the 60 s smoke reaches them only on a quiet machine): compile_blocks (eager backend),
    the four samplers compiled, the wavefront, end to end with the VAE."""
    done = subprocess.run([*CHECK, "--skip", "dit", "dmd", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())["results"]
    assert "dit.6.step_first" not in results and "dmd.peak_memory" not in results
    for key in ("compiled.compile", "compiled.6.step_first", "compiled.6.block_first_fused", "wavefront.6",
                "vae.6.block_first_fused"):
        assert key in results and "error" not in results[key], (key, results.get(key))
    compiled = results["compiled.compile"]
    if "skipped" not in compiled:  # eager backend: no inductor artifacts to save, and it says so
        assert compiled["compile_s"] > 0 and compiled["compile_cache"]["saved"] is False
    for key in ("compiled.6.block_first_fused", "wavefront.6"):
        if "skipped" not in results[key]:
            assert results[key]["forwards"] == results[key]["expected_forwards"]


def test_gpu_check_killed_midway_leaves_valid_json(tmp_path):
    """A kill at any moment leaves the results so far: the JSON is rewritten atomically after each one."""
    proc = subprocess.Popen([*CHECK, "--out", str(tmp_path)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    path = tmp_path / "gpu_check.json"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if path.exists() and len(json.loads(path.read_text())["results"]) >= 3:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    report = json.loads(path.read_text())  # valid JSON, whatever the moment of the kill
    assert not report["complete"] and len(report["results"]) >= 3
    assert list(report["results"])[0] == "preflight.versions"
