"""Pipelined parallel inference (gloo, 2 and 4 processes), fusion, the single-device wavefront, the schedule model."""

from pathlib import Path

import pytest
import torch

from src.distributed.launch import launch_local
from src.models.wan import WanConfig, WanDiT
from src.perf.timing_model import (
    ForwardCost,
    Op,
    ScheduleModel,
    context_frames,
    fit_forward_cost,
    simulate,
)
from src.sampling.noise import NoiseBank
from src.sampling.orders import SamplerConfig, forward_count, sample
from src.sampling.pipeline import pipeline_blocks, pipeline_sample, split_steps, stage_cells
from src.sampling.wavefront import wavefront_blocks, wavefront_sample

TOY = WanConfig(dim=32, ffn_dim=64, freq_dim=32, num_heads=2, num_layers=1, in_dim=4, out_dim=4, text_len=8,
                text_dim=16)
LATENT = (4, 4, 4)
BLOCKS = (7, 27)  # 21 and 81 latent frames: inside and beyond the 21-frame rolling window
SEED = 5


def toy_model() -> WanDiT:
    torch.manual_seed(0)
    return WanDiT(TOY).eval()


def toy_context(batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, TOY.text_len, TOY.text_dim, generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as the pipeline workers use: comparisons can be bit for bit, and tiny forwards do not
    stall on thread synchronisation when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def step_first_reference(model, context, blocks: int, cfg: SamplerConfig) -> torch.Tensor:
    with torch.no_grad():
        return sample(model, context, 3 * blocks, LATENT, cfg, NoiseBank(SEED), order="step_first")


def _pipeline_worker(rank: int, world: int, out_dir: str):
    model, context, cfg = toy_model(), toy_context(), SamplerConfig()
    owned = len(split_steps(cfg.num_steps, world)[rank])
    for blocks in BLOCKS:
        for fuse in (False, True):
            trace = []
            video = pipeline_sample(model, context, 3 * blocks, LATENT, cfg, NoiseBank(SEED), fuse=fuse, trace=trace)
            assert (video is not None) == (rank == world - 1)
            kinds = [kind for kind, *_ in trace]
            # the schedule, by its forwards: fused = one forward per cell (write of n-1 inside the denoise of n)
            if fuse:
                assert kinds.count("fused") == owned * (blocks - 1) and "write" not in kinds
                assert kinds.count("denoise") == owned
            else:
                assert kinds.count("write") == owned * (blocks - 1) and "fused" not in kinds
                assert kinds.count("denoise") == owned * blocks
            if video is not None:
                torch.save(video, Path(out_dir) / f"{blocks}_{fuse}.pt")


@pytest.mark.parametrize("world", [2, 4])  # S = 4 steps: two steps per process (N < S), one per process (N = S)
def test_pipelined_equals_step_first(tmp_path, world):
    launch_local(world, _pipeline_worker, str(tmp_path))
    model, context, cfg = toy_model(), toy_context(), SamplerConfig()
    for blocks in BLOCKS:
        ref = step_first_reference(model, context, blocks, cfg)
        unfused = torch.load(tmp_path / f"{blocks}_False.pt", weights_only=True)
        fused = torch.load(tmp_path / f"{blocks}_True.pt", weights_only=True)
        assert torch.equal(unfused, ref)
        assert (fused - unfused).abs().max() < 1e-5  # the fused schedule is checked by its forwards in the worker


def test_single_process_pipeline_streams_step_first():
    model, context = toy_model(), toy_context(batch=2)
    cfg = SamplerConfig(window=6, sink=3)
    ref = step_first_reference(model, context, 7, cfg)
    blocks = list(pipeline_blocks(model, context, 21, LATENT, cfg, NoiseBank(SEED)))
    assert [n for n, _ in blocks] == list(range(7))
    assert torch.equal(torch.cat([x for _, x in blocks], 1), ref)
    trace = []
    fused = pipeline_sample(model, context, 21, LATENT, cfg, NoiseBank(SEED), fuse=True, trace=trace)
    assert (fused - ref).abs().max() < 1e-5
    assert len(trace) == 4 * 7  # N forwards per step instead of 2N - 1
    with pytest.raises(ValueError, match="context_level"):
        pipeline_sample(model, context, 21, LATENT, SamplerConfig(context_level="current"), NoiseBank(0), fuse=True)
    with pytest.raises(ValueError, match="prompt schedule"):
        pipeline_sample(model, {0: context}, 21, LATENT, cfg, NoiseBank(0))


def test_split_steps_and_stage_order():
    assert split_steps(4, 4) == [range(0, 1), range(1, 2), range(2, 3), range(3, 4)]
    assert split_steps(4, 3) == [range(0, 2), range(2, 3), range(3, 4)]
    assert split_steps(4, 1) == [range(0, 4)]
    for bad in (0, 5):
        with pytest.raises(ValueError, match="between 1 and 4 processes"):
            split_steps(4, bad)
    assert stage_cells(range(1, 3), 2) == [(0, 1), (0, 2), (1, 1), (1, 2)]


@pytest.mark.parametrize("overrides", [{}, {"context_level": "current"}, {"window": 6, "sink": 3}])
def test_wavefront_equals_step_first(overrides):
    model, context = toy_model(), toy_context(batch=2)
    cfg = SamplerConfig(**overrides)
    for blocks in BLOCKS:
        ref = step_first_reference(model, context, blocks, cfg)
        trace = []
        stream = wavefront_blocks(model, context, 3 * blocks, LATENT, cfg, NoiseBank(SEED), trace=trace)
        first = next(stream)
        assert first[0] == 0 and len(trace) == cfg.num_steps  # first block after S forwards
        out = torch.cat([first[1]] + [x for _, x in stream], 1)
        assert len(trace) == blocks + cfg.num_steps - 1
        assert (out - ref).abs().max() < 1e-5


def test_wavefront_rejects_prompt_schedule():
    with pytest.raises(ValueError, match="prompt schedule"):
        wavefront_sample(toy_model(), {0: toy_context()}, 21, LATENT, SamplerConfig(), NoiseBank(0))


def test_schedule_model_counts_and_unit_costs():
    cfg, n_blocks, s = SamplerConfig(window=None), 7, 4
    unit = ScheduleModel(ForwardCost(1.0, 0.0, 0.0), cfg, n_blocks)
    bf, sf = unit.predict("block_first"), unit.predict("step_first")
    assert bf.forwards == forward_count(cfg.with_order("block_first"), n_blocks) and bf.total_s == bf.forwards
    assert sf.forwards == forward_count(cfg.with_order("step_first"), n_blocks) and sf.total_s == sf.forwards
    assert bf.first_block_s == s and sf.first_block_s == (s - 1) * (2 * n_blocks - 1) + 1
    assert unit.predict("pipelined", 1).total_s == sf.total_s
    assert unit.predict("pipelined", s).total_s == 2 * n_blocks - 1 + s - 1  # DAC: writes overlap the next stage
    assert unit.predict("pipelined", s, fuse=True).total_s == n_blocks + s - 1
    assert unit.predict("pipelined", s, cores=1).total_s == sf.total_s  # one core: no parallelism left
    wf = unit.predict("wavefront")
    assert (wf.total_s, wf.first_block_s, wf.forwards) == (n_blocks + s - 1, s, n_blocks + s - 1)
    slow_link = ScheduleModel(ForwardCost(1.0, 0.0, 0.0), cfg, n_blocks, transfer_s=0.5)
    assert slow_link.predict("pipelined", s, fuse=True).total_s == n_blocks + s - 1 + 3 * 0.5
    ops, _ = unit.program("pipelined", 2)
    assert unit.predict("pipelined", 2, seconds=[2.0] * len(ops)).total_s == 2 * unit.predict("pipelined", 2).total_s
    assert context_frames(30, 21, 3) == 24 and context_frames(9, 21, 3) == 9 and context_frames(9, None, 0) == 9
    with pytest.raises(ValueError, match="deadlocks"):
        simulate([Op(0, 1.0, (1,)), Op(0, 1.0)])
    with pytest.raises(ValueError, match="pipelined order only"):
        unit.predict("step_first", processes=2)
    with pytest.raises(ValueError, match="durations"):
        unit.predict("step_first", seconds=[1.0])


def test_fit_forward_cost_recovers_coefficients():
    true = ForwardCost(0.01, 0.002, 0.0003)
    samples = [(q, k, r, true(q, k, r)) for q in (3, 6) for k in (6, 12, 24) for r in (1, 2)]
    fit = fit_forward_cost(samples)
    assert fit.a == pytest.approx(true.a) and fit.b == pytest.approx(true.b) and fit.c == pytest.approx(true.c)
    with pytest.raises(ValueError, match="three distinct"):
        fit_forward_cost(samples[:1] * 3)


def test_wavefront_flex_backend_and_bfloat16():
    """The wavefront through flex_attention BlockMasks (eager on CPU) equals step-first; in bf16 the wavefront and
    the fused single-process pipeline run, stay finite and close to float32."""
    model, context = toy_model(), toy_context()
    cfg = SamplerConfig(window=6, sink=3)
    ref = step_first_reference(model, context, 7, cfg)
    model.attention_backend = "flex"
    assert (wavefront_sample(model, context, 21, LATENT, cfg, NoiseBank(SEED)) - ref).abs().max() < 1e-5
    model.attention_backend = "auto"
    bf16 = toy_model().to(torch.bfloat16)
    ctx16 = context.to(torch.bfloat16)
    with torch.no_grad():
        for out in (wavefront_sample(bf16, ctx16, 21, LATENT, cfg, NoiseBank(SEED)),
                    pipeline_sample(bf16, ctx16, 21, LATENT, cfg, NoiseBank(SEED), fuse=True)):
            assert torch.isfinite(out).all()  # float32 latents (the noise); the bf16 model casts inside
            assert (out.float() - ref).abs().max() <= 0.1 * ref.abs().max()
