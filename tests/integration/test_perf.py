"""`make bench-gpu`'s code path on CPU (--smoke): every metric for every sampler, and the counted forwards."""

import json

import torch

from src.perf import gpu as bench_gpu
from src.sampling.orders import SamplerConfig, forward_count

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


def test_gpu_check_smoke(tmp_path):
    """`make gpu-check`'s code path on CPU: bench-gpu, the attention modes with their useful TFLOP/s, and the DMD part
    (the estimator's functions, or a recorded reason why they are unavailable), in one JSON."""
    from src.perf import check as gpu_check

    torch.set_num_threads(1)
    report = gpu_check.main(["--smoke", "--out", str(tmp_path), "--skip", "compile"])
    written = json.loads((tmp_path / "gpu_check_cpu-smoke.json").read_text())
    assert written["machine"]["device"] == "cpu-smoke" and written["bench_compiled"] is None
    assert set(written["bench_eager"]["results"]) == {"6"}
    assert written["bench_eager"]["setup"]["attention_kernel"] == "sdpa"
    modes = written["attention_modes"]
    assert set(modes) == {"bidirectional", "block_causal_one_pass", "cached_steady_state", "cached_window_and_sinks",
                          "fused_two_blocks"}
    for name, m in modes.items():
        assert "error" not in m, (name, m)
        assert m["flops"] > 0 and m["tflops_per_s"] > 0
    assert modes["bidirectional"]["visible_pairs"] == (9 * 6) ** 2 and modes["bidirectional"]["calls_per_layer"] == 1
    assert modes["cached_steady_state"]["cache_mode"] == "in_place"
    assert modes["cached_steady_state"]["visible_pairs"] == 3 * 6 * 6 * 6  # a full window of 6 frames, no mask
    dmd = written["dmd_iteration"]
    for part in ("estimated", "measured"):
        assert "error" not in dmd[part], dmd[part]
        assert set(dmd[part]["updates"]) == {"generator", "critic"}
    assert report["seconds"]["total"] > 0
