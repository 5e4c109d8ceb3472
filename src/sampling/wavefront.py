"""Single-device wavefront: the pipelined step-first schedule on one device, one batched forward per tick.

At tick d the ready cells are (n, j) with n + j = d, one per step j (each step keeps its own KV cache, as a pipeline
stage does). All of them run in **one** forward, each cell a group of batch rows with its own timesteps, its own cache
and its own attention mask, fused with the cache write of its step's previous block (the paper's fusion; with
context_level "current" the chunk writes itself instead). Blocks stream out from tick S-1 on: the first block
after S forwards instead of (S-1)(2N-1) + 1 for the step-first loop, N + S - 1 forwards in all.

How the cells share one forward: the projections, norms and FFN run on all rows at once; the self-attention runs
per cell (``GroupedAttention``), each group of rows through its own step's ``KVCache`` (in place, no mask, no padding)
at its true frames (its own RoPE table). With fusion every chunk is [context of block n-1, block n] (2f frames,
block-causal inside, writing the first f); block 0 has no context, so a dummy prefix that no real query sees (and that
sees only itself) keeps the chunks the same length. The result equals the step-first sampler up to float rounding
(batching changes the reductions of the shared matmuls; tests use 1e-5).

The batched forward is the model's own ``WanDiT.forward_groups`` (one ``RowGroup`` per cell); the equality test
against ``orders.sample(order="step_first")`` guards it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from src.models.attention import RowGroup
from src.models.kv_cache import schedule_slots
from src.sampling.noise import NoiseBank
from src.sampling.orders import SamplerConfig, denoise_cell


def wavefront_blocks(model, context: torch.Tensor, num_frames: int, latent_shape: Sequence[int], cfg: SamplerConfig,
                     bank: NoiseBank, *, trace: list | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (block, x0_hat [B, f, C, h, w]) in block order, one per tick from tick S-1 on.

    context: text embeddings [B, L, D] (one prompt). trace: receives (tick, cells, start_s, end_s) per forward
    (synchronised on CUDA). Equals ``sample(order="step_first")`` up to float rounding (module docstring).
    """
    if not isinstance(context, torch.Tensor):
        raise ValueError("the wavefront sampler takes one text context tensor [B, L, D] (no prompt schedule)")
    fpb = cfg.frames_per_block
    if num_frames <= 0 or num_frames % fpb:
        raise ValueError(f"num_frames={num_frames} is not a positive multiple of frames_per_block={fpb}")
    num_blocks, num_steps, ts = num_frames // fpb, cfg.num_steps, cfg.timesteps
    fused = cfg.context_level != "current"
    block_shape = (context.shape[0], fpb, *latent_shape)
    device = context.device
    slots = schedule_slots(cfg.window, cfg.sink, (2 if fused else 1) * fpb, fpb)
    caches = [model.new_cache(window=cfg.window, sink=cfg.sink, slots=slots) for _ in range(num_steps)]
    inputs: dict[tuple[int, int], torch.Tensor] = {}  # (step, block) -> input
    pending: dict[int, tuple[torch.Tensor, float]] = {}  # step -> context of its previous block, unwritten
    text_kv: dict[int, list] = {}
    t0 = time.perf_counter()
    for d in range(num_blocks + num_steps - 1):
        work = [(d - j, j) for j in range(num_steps) if 0 <= d - j < num_blocks]
        xs, chunk_t, groups = [], [], []  # per cell: its chunk, per-frame timesteps and row group
        for n, j in work:
            x = bank.noise("init", 0, n, block_shape, device) if j == 0 else inputs.pop((j, n))
            rows = x.shape[0]
            more = n < num_blocks - 1
            if not fused:
                chunk, t = x, torch.full((fpb,), ts[j], device=device)
                groups.append(RowGroup(rows, caches[j], n * fpb, fpb if more else 0))
            elif n == 0:  # a dummy prefix keeps every chunk 2f frames long
                chunk, t = torch.cat([torch.zeros_like(x), x], 1), torch.full((2 * fpb,), ts[j], device=device)
                groups.append(RowGroup(rows, caches[j], -fpb, 0, isolated=fpb))
            else:
                prefix, prefix_t = pending.pop(j)
                chunk = torch.cat([prefix, x], 1)
                t = torch.cat([torch.full((fpb,), prefix_t, device=device), torch.full((fpb,), ts[j], device=device)])
                groups.append(RowGroup(rows, caches[j], (n - 1) * fpb, fpb))
            xs.append(chunk)
            chunk_t.append(t[None].expand(rows, -1))
        rows = sum(g.rows for g in groups)
        start = time.perf_counter()
        v = model.forward_groups(torch.cat(xs), torch.cat(chunk_t), context.repeat(len(groups), 1, 1), groups, fpb,
                                 text_kv.setdefault(rows, [None] * model.cfg.num_layers))
        if trace is not None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            trace.append((d, len(groups), start - t0, time.perf_counter() - t0))
        row = 0
        for (n, j), chunk in zip(work, xs):
            b = chunk.shape[0]
            cell = denoise_cell(model, chunk[:, -fpb:], j, n, context, caches[j], cfg, bank,
                                write=n < num_blocks - 1, velocity=v[row:row + b, -fpb:])
            row += b
            if j == num_steps - 1:
                yield n, cell.x0
            else:
                inputs[(j + 1, n)] = cell.x_next
            if n < num_blocks - 1 and not cell.written:
                pending[j] = (cell.context, cell.context_t)


def wavefront_sample(model, context: torch.Tensor, num_frames: int, latent_shape: Sequence[int], cfg: SamplerConfig,
                     bank: NoiseBank, *, trace: list | None = None) -> torch.Tensor:
    """The whole video [B, num_frames, C, h, w] by the single-device wavefront."""
    return torch.cat([x0 for _, x0 in wavefront_blocks(model, context, num_frames, latent_shape, cfg, bank,
                                                       trace=trace)], dim=1)
