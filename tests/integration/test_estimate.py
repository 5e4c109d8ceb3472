"""The memory/FLOP estimator on a small world: fake tensors allocate what real ones do, the strategies' static
memory, the verdicts, the API; and `make bench-gpu --smoke` in bf16 on CPU."""

import json

import pytest
import torch

from src.perf import gpu as bench_gpu
from src.perf.estimate import (
    GIB,
    estimate_dmd_iteration,
    measure_dmd_iteration,
    static_memory,
    tracked_iteration,
    verdicts,
)
from src.perf.estimate import compose as compose_config

SMALL = ["experiment=hiar_fkl", "world=wan2.1_1.3b", "world.latent.height=8", "world.latent.width=8",
         "task.num_frames=6", "world.text_encoder.text_len=16", "world.training.batch_size=1",
         *[f"world.{m}.{k}={v}" for m in ("student", "critic", "teacher")
           for k, v in {"dim": 64, "ffn_dim": 128, "num_heads": 2, "num_layers": 2, "text_dim": 4096}.items()]]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fake_tensors_allocate_what_real_tensors_do(precision):
    """The same tracker, same code, fake vs real tensors (CPU attention kernels on both): equal bytes per category."""
    torch.manual_seed(0)
    cfg = compose_config([*SMALL, f"trainer.precision={precision}", "world.training.activation_checkpointing=true"])
    mode = "autocast_bf16" if precision == "bf16-mixed" else "fp32"
    fake = tracked_iteration(cfg, mode, fake=True, gpu_kernels=False, exit_step=1)
    real = tracked_iteration(cfg, mode, fake=False, exit_step=1)
    for update in ("generator", "critic"):
        f, r = fake["updates"][update], real["updates"][update]
        assert r["peak"] > 0 and r["peak_by_category"]["activations"] > 0
        assert f["peak"] == pytest.approx(r["peak"], rel=0.02), update
        for category, nbytes in r["peak_by_category"].items():
            assert f["peak_by_category"].get(category, 0) == pytest.approx(nbytes, rel=0.05, abs=4096), category
        assert f["kv_cache"] == r["kv_cache"] > 0 or update == "critic"
        assert f["flops"] == r["flops"] > 0


def test_checkpointing_lowers_the_measured_activations():
    on, off = (tracked_iteration(compose_config([*SMALL, f"world.training.activation_checkpointing={flag}"]),
                                 "fp32", fake=True, exit_step=0) for flag in ("true", "false"))
    for update in ("generator", "critic"):
        assert on["updates"][update]["peak_by_category"]["activations"] < \
            off["updates"][update]["peak_by_category"]["activations"]
        assert on["updates"][update]["flops"] > off["updates"][update]["flops"]  # the recompute


def test_static_memory_shards_as_each_strategy_does():
    counts = {"generator": 1000, "critic": 1000, "teacher": 10000}
    block = {"generator": 10, "critic": 10, "teacher": 100}
    ddp = static_memory("ddp", 8, counts, block, "generator", 2)
    assert ddp == {"weights": 8000, "gradients": 4000, "master_and_optimizer": 16000, "teacher": 20000, "gathered": 0}
    zero2 = static_memory("deepspeed_zero2", 8, counts, block, "generator", 2, bucket_elements=10)
    assert zero2["weights"] == 4000 and zero2["master_and_optimizer"] == 12 * 2000 / 8 and zero2["teacher"] == 20000
    offload = static_memory("deepspeed_zero2_offload", 8, counts, block, "generator", 2, bucket_elements=10)
    assert offload["master_and_optimizer"] == 0 and offload["gradients"] == 20
    zero3 = static_memory("deepspeed_zero3", 8, counts, block, "generator", 2)
    assert zero3["weights"] == 4000 / 8 and zero3["teacher"] == 20000 / 8
    fsdp = static_memory("fsdp2", 8, counts, block, "generator", 2)
    assert fsdp["weights"] == 8000 / 8 and fsdp["teacher"] == 20000 / 8
    with pytest.raises(ValueError, match="unknown strategy"):
        static_memory("zero9", 8, counts, block, "generator", 2)


def test_verdicts():
    v = verdicts(peak=60 * GIB, static=40 * GIB, act_per_sample=10 * GIB, frames=21, frames_per_block=3)
    assert v["24"]["verdict"] == "no" and v["24"]["max_batch"] == 0
    assert v["80"]["verdict"] == "fits" and v["80"]["max_batch"] == 3  # (78 - 40) // 10
    assert v["141"]["max_frames_at_batch_1"] % 3 == 0 and v["141"]["max_frames_at_batch_1"] > 21
    assert verdicts(peak=75 * GIB, static=40 * GIB, act_per_sample=35 * GIB, frames=21,
                    frames_per_block=3)["80"]["verdict"] == "tight"


def test_estimate_and_measure_api(tmp_path):
    overrides = [*SMALL, "trainer=gpu_bf16", "strategy=deepspeed_zero2", "trainer.devices=1"]
    est = estimate_dmd_iteration(overrides)
    assert est["strategy"] == "deepspeed_zero2" and est["compute"] == "bf16_weights"
    assert set(est["updates"]) == {"generator", "critic"} and est["iteration_tflops"] > 0
    assert set(est["verdicts"]) == {"24", "48", "80", "141"}
    for u in est["updates"].values():
        assert u["peak_gib"] == pytest.approx(sum(u["static_gib"].values()) + u["activations_gib"])
    measured = measure_dmd_iteration(overrides)
    assert measured["device"] == "cpu" and set(measured["updates"]) == {"generator", "critic"}
    with pytest.raises(ValueError, match="distillation stage"):
        estimate_dmd_iteration(["experiment=ode_init"])


def test_bench_gpu_smoke_in_bf16(tmp_path):
    """Every sampler and the VAE decode in bf16 (one block: bf16 convolutions are slow on CPU)."""
    out = tmp_path / "smoke.json"
    bench_gpu.main(["--smoke", "--dtype", "bfloat16", "--frames", "3", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["setup"]["dtype"] == "bfloat16"
    assert set(report["results"]["3"]) == set(bench_gpu.SAMPLERS)
    for r in report["results"]["3"].values():
        assert r["dit"]["total_s"] > 0 and r["end_to_end"]["total_s"] > 0 and r["dit"]["flops"] > 0
