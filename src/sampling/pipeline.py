"""Pipelined parallel inference (HiAR §6): one process per contiguous range of denoising steps.

In the step-first order cell (block n, step j) depends only on (n-1, j) -- through step j's cache -- and on (n, j-1)
-- its input x^(n)_{t_j}. So each process owns steps lo..hi-1 and one KV cache per owned step, and runs its cells
along anti-diagonals as soon as their two dependencies are done: the input of its first step arrives from the
previous process by asynchronous point-to-point (``irecv``, posted ahead), the output of its last step leaves for the
next process (``isend``) right after the denoise forward and *before* the cache write ("DAC": Denoise, Add noise,
send, Cache write, as the released script does), so the write overlaps the next process's denoise. Every cell is
``orders.denoise_cell`` with the same cache contents, inputs and noise-bank addresses as the single-process
step-first sampler, so the output is the same bit for bit, for any number of processes from 1 to S.

Fusion (``fuse=True``, the paper's variant): the cache write of block n-1 and the denoise of block n at the same step
are one forward over the chunk [c^(n-1), x^(n)_{t_j}] with per-frame timesteps [t_c x f, t_j x f], block-causal
inside the chunk, writing only the first f frames: N forwards per step instead of 2N - 1 (block 0 alone; the last
block's context is never written). Equal to the unfused result up to float rounding.

    torchrun --nproc_per_node 4 -m src.sampling.pipeline --blocks 7 --toy --check
    torchrun --nproc_per_node 4 -m src.sampling.pipeline --checkpoint hiar.pt --context text.pt --blocks 27 --fuse

gloo on CPU, NCCL on GPU (one GPU per process, ``LOCAL_RANK``). ``src.distributed.launch.launch_local`` spawns a local
process group (tests, experiments).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from src.models.kv_cache import schedule_slots
from src.sampling.noise import NoiseBank
from src.sampling.orders import SamplerConfig, check_prefix, clean_context, denoise_cell, sample
from src.sampling.primitive import fused_velocity, write_context

LOOKAHEAD = 2  # receives posted ahead of the block being denoised


def split_steps(num_steps: int, world: int) -> list[range]:
    """Contiguous, balanced step ranges, one per process (the first num_steps % world ranges get one more step)."""
    if not 1 <= world <= num_steps:
        raise ValueError(f"the pipeline needs between 1 and {num_steps} processes (one per step at most), got {world}")
    base, extra = divmod(num_steps, world)
    ranges, lo = [], 0
    for r in range(world):
        hi = lo + base + (r < extra)
        ranges.append(range(lo, hi))
        lo = hi
    return ranges


def stage_cells(steps: range, num_blocks: int) -> list[tuple[int, int]]:
    """The order in which a process runs its cells (block, step): by anti-diagonal, later steps first within one
    (their outputs leave for the next process earlier; the input of the first step has longer to arrive)."""
    order = []
    for d in range(num_blocks + len(steps) - 1):
        for j in reversed(steps):
            n = d - (j - steps.start)
            if 0 <= n < num_blocks:
                order.append((n, j))
    return order


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pipeline_blocks(model, context: torch.Tensor, num_frames: int, latent_shape: Sequence[int], cfg: SamplerConfig,
                    bank: NoiseBank, *, fuse: bool = False, group=None, trace: list | None = None,
                    prefix: torch.Tensor | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Run this process's stage; on the process owning the last step, yield (block, x0_hat [B, f, C, h, w]) in
    block order as each block is final (other processes yield nothing). Without an initialised process group it
    runs all steps in this process (world 1).

    context: text embeddings [B, L, D] (one prompt). trace: a list that receives (kind, block, step, start_s, end_s)
    for every forward ("denoise", "write" or "fused"; times from the call, synchronised on CUDA). prefix: given frames
    (clean latents of the first m blocks), written into every owned step's cache as the step-first sampler writes them
    (``orders``, "Given frames"); the cells start at block m.
    """
    if not isinstance(context, torch.Tensor):
        raise ValueError("the pipelined sampler takes one text context tensor [B, L, D] (no prompt schedule)")
    if fuse and cfg.context_level == "current":
        raise ValueError('fuse needs a separate context write; context_level "current" writes in the denoise forward')
    fpb = cfg.frames_per_block
    if num_frames <= 0 or num_frames % fpb:
        raise ValueError(f"num_frames={num_frames} is not a positive multiple of frames_per_block={fpb}")
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(group) if distributed else 0
    world = dist.get_world_size(group) if distributed else 1
    steps = split_steps(cfg.num_steps, world)[rank]
    prev_rank, next_rank = (rank - 1, rank + 1) if group is None else (
        dist.get_global_rank(group, max(rank - 1, 0)), dist.get_global_rank(group, min(rank + 1, world - 1)))
    num_blocks, last_step, ts = num_frames // fpb, cfg.num_steps - 1, cfg.timesteps
    block_shape = (context.shape[0], fpb, *latent_shape)
    device = context.device
    slots = schedule_slots(cfg.window, cfg.sink, (2 if fuse else 1) * fpb, fpb)
    caches = {j: model.new_cache(window=cfg.window, sink=cfg.sink, slots=slots) for j in steps}
    local: dict[tuple[int, int], torch.Tensor] = {}  # (step, block) -> input made by this process
    pending: dict[int, tuple[torch.Tensor, float]] = {}  # step -> context of its previous block, unwritten (fuse)
    recvs: dict[int, tuple[torch.Tensor, object]] = {}
    sends = []
    t0 = time.perf_counter()
    prefix = check_prefix(prefix, block_shape, num_frames)
    given = 0 if prefix is None else prefix.shape[1] // fpb
    for j in steps:  # the given blocks' clean-context writes; with fuse, the last rides in block m's first forward
        for n in range(given):
            c = clean_context(prefix[:, n * fpb:(n + 1) * fpb], j, n, cfg, bank)
            if fuse and n == given - 1:
                pending[j] = c
            else:
                write_context(model, *c, context, caches[j], n * fpb)
    if last_step in steps:
        yield from ((n, prefix[:, n * fpb:(n + 1) * fpb]) for n in range(given))

    def post_recv(n: int):
        if steps.start > 0 and n < num_blocks and n not in recvs:
            buf = torch.empty(block_shape, dtype=torch.float32, device=device)
            recvs[n] = (buf, dist.irecv(buf, src=prev_rank, group=group, tag=n))

    def timed(kind: str, n: int, j: int, fn: Callable, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        if trace is not None:
            _sync(device)
            trace.append((kind, n, j, start - t0, time.perf_counter() - t0))
        return out

    for n in range(given, given + LOOKAHEAD):
        post_recv(n)
    for n, j in ((n + given, j) for n, j in stage_cells(steps, num_blocks - given)):
        if j > steps.start:
            x = local.pop((j, n))
        elif j == 0:
            x = bank.noise("init", 0, n, block_shape, device)
        else:
            x, work = recvs.pop(n)
            work.wait()
            post_recv(n + LOOKAHEAD)
        more, cache = n < num_blocks - 1, caches[j]
        if fuse and n > 0:
            v = timed("fused", n, j, fused_velocity, model, *pending.pop(j), x, ts[j], context, cache, n, fpb)
            cell = denoise_cell(model, x, j, n, context, cache, cfg, bank, write=more, velocity=v)
        else:
            cell = timed("denoise", n, j, denoise_cell, model, x, j, n, context, cache, cfg, bank, write=more)
        if j == last_step:
            yield n, cell.x0
        elif j == steps[-1]:
            sends.append(dist.isend(cell.x_next.contiguous(), dst=next_rank, group=group, tag=n))
        else:
            local[(j + 1, n)] = cell.x_next
        if more and not cell.written:
            if fuse:
                pending[j] = (cell.context, cell.context_t)
            else:
                timed("write", n, j, write_context, model, cell.context, cell.context_t, context, cache, n * fpb)
        sends = [w for w in sends if not w.is_completed()]
    for work in sends:
        work.wait()


def pipeline_sample(model, context: torch.Tensor, num_frames: int, latent_shape: Sequence[int], cfg: SamplerConfig,
                    bank: NoiseBank, *, fuse: bool = False, group=None, trace: list | None = None,
                    prefix: torch.Tensor | None = None) -> torch.Tensor | None:
    """The whole video [B, num_frames, C, h, w] on the process owning the last step, None on the others."""
    blocks = [x0 for _, x0 in pipeline_blocks(model, context, num_frames, latent_shape, cfg, bank, fuse=fuse,
                                              group=group, trace=trace, prefix=prefix)]
    return torch.cat(blocks, dim=1) if blocks else None


# --------------------------------------------------------------------------------------------- torchrun entry


def _parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m src.sampling.pipeline", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="any checkpoint src.checkpoints.load_dit reads")
    src.add_argument("--toy", action="store_true", help="a random toy DiT (dim 32, 1 layer, seed 0)")
    p.add_argument("--context", help="text embeddings [B, L, D] saved with torch.save (default: random, seed 1)")
    p.add_argument("--blocks", type=int, default=7)
    p.add_argument("--frames-per-block", type=int, default=3)
    p.add_argument("--latent", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                   help="latent channels and size (default: 16 60 104 with --checkpoint, 4 4 4 with --toy)")
    p.add_argument("--steps", type=float, nargs="+", default=SamplerConfig().steps)
    p.add_argument("--window", type=int, default=21, help="rolling window in latent frames (0: unbounded)")
    p.add_argument("--seed", type=int, default=0, help="noise bank seed")
    p.add_argument("--fuse", action="store_true", help="fuse each cache write into the next block's denoise")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--out", help="save the latents [B, F, C, h, w] (last stage) to this .pt file")
    p.add_argument("--check", action="store_true", help="compare with the single-process step-first sampler")
    return p.parse_args(argv)


def main(argv=None):
    from src.checkpoints import load_dit
    from src.models.wan import WanConfig, WanDiT

    a = _parse(argv)
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]
    if a.toy:
        torch.manual_seed(0)
        model = WanDiT(WanConfig(dim=32, ffn_dim=64, freq_dim=32, num_heads=2, num_layers=1, in_dim=4, out_dim=4,
                                 text_len=8, text_dim=16))
        latent = a.latent or [4, 4, 4]
    else:
        model = load_dit(a.checkpoint)
        latent = a.latent or [16, 60, 104]
    model = model.to(device=device, dtype=dtype).eval()
    if a.context:
        context = torch.load(a.context, map_location=device, weights_only=True)
    else:
        context = torch.randn(1, model.cfg.text_len, model.cfg.text_dim, generator=torch.Generator().manual_seed(1))
    context = context.to(device)
    cfg = SamplerConfig(steps=a.steps, frames_per_block=a.frames_per_block, window=a.window or None)
    num_frames = a.blocks * a.frames_per_block
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    video = pipeline_sample(model, context, num_frames, latent, cfg, NoiseBank(a.seed), fuse=a.fuse)
    _sync(device)
    elapsed = time.perf_counter() - start
    if video is not None:
        report = {"processes": dist.get_world_size() if dist.is_initialized() else 1, "blocks": a.blocks,
                  "fuse": a.fuse, "seconds": elapsed, "shape": list(video.shape)}
        if a.check:
            with torch.no_grad():
                ref = sample(model, context, num_frames, latent, cfg, NoiseBank(a.seed), order="step_first")
            report["equal_to_step_first"] = bool(torch.equal(ref, video))
            report["max_abs_diff"] = float((ref - video).abs().max())
        if a.out:
            torch.save(video.cpu(), a.out)
        print(json.dumps(report))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
