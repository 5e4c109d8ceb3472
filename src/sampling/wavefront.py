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

``batched_forward`` mirrors ``WanDiT.forward`` (embeddings, blocks, head) with the grouped attention; the equality test
against ``schedules.sample(order="step_first")`` guards it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from src.models.wan import ChunkAttention, GroupedAttention, KVCache, rope_tables, sinusoidal_embedding
from src.sampling.noise import NoiseBank
from src.sampling.schedules import SamplerConfig, denoise_cell


@dataclass
class CellChunk:
    """One cell's part of a batched forward."""

    x: torch.Tensor  # [B, F, C, h, w] the chunk (context prefix + block, or the block alone)
    t: torch.Tensor  # [F] per-frame timesteps
    cache: KVCache  # the cell's step cache
    start: int  # true first frame of the chunk
    write: int  # frames of the chunk written to the cache (0: none)
    dummy: int  # leading frames that are padding (no real query sees them)


def batched_forward(model, cells: list[CellChunk], context: torch.Tensor, fpb: int, text_kv: list) -> torch.Tensor:
    """One no-grad forward over several cells (equal chunk lengths): velocity [sum of rows, F, C, h, w].

    ``context``: text embeddings for all rows; ``text_kv``: per-layer text keys/values for this row layout (a list of
    None filled on first use)."""
    x = torch.cat([c.x for c in cells], dim=0)
    b, n_frames, _, height, width = x.shape
    cfg = model.cfg
    _, ph, pw = cfg.patch_size
    h, w = height // ph, width // pw
    tpf = h * w
    t = torch.cat([c.t.to(x.device)[None].expand(c.x.shape[0], -1) for c in cells], dim=0).float()
    with torch.no_grad():  # as WanDiT.forward, with one attention plan per cell
        plans = [ChunkAttention(c.cache, c.start, n_frames, tpf, fpb, c.cache.window, c.cache.sink, c.write,
                                model.attention_backend, isolated=c.dummy) for c in cells]
        attn = GroupedAttention(plans, [c.x.shape[0] for c in cells], text_kv)
        tables = [rope_tables(cfg.head_dim, c.start, n_frames, h, w, x.device) for c in cells]
        rope = torch.cat([tab.expand(c.x.shape[0], -1, -1, -1, -1) for tab, c in zip(tables, cells)])
        dtype = model.patch_embedding.weight.dtype
        tokens = model.patch_embedding(x.to(dtype).permute(0, 2, 1, 3, 4)).flatten(2).transpose(1, 2).float()
        emb = sinusoidal_embedding(cfg.freq_dim, t).to(model.time_embedding[0].weight.dtype)
        e = model.time_embedding(emb).float()
        e0 = model.time_projection(e.to(dtype)).float().unflatten(1, (6, cfg.dim))
        e, e0 = e.view(b, n_frames, -1), e0.view(b, n_frames, 6, -1)
        text = None if text_kv[0] is not None else model.embed_text(context)
        tokens = model.run_blocks(tokens, e0, text, rope, attn)
        attn.finish()
        out = model.head(tokens, e)
    c_out = cfg.out_dim
    out = out.view(b, n_frames, h, w, ph, pw, c_out).permute(0, 1, 6, 2, 4, 3, 5)
    return out.reshape(b, n_frames, c_out, height, width).to(x.dtype)


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
    caches = [model.new_cache(window=cfg.window, sink=cfg.sink) for _ in range(num_steps)]
    inputs: dict[tuple[int, int], torch.Tensor] = {}  # (step, block) -> input
    pending: dict[int, tuple[torch.Tensor, float]] = {}  # step -> context of its previous block, unwritten
    text_kv: dict[int, list] = {}
    t0 = time.perf_counter()
    for d in range(num_blocks + num_steps - 1):
        work = [(d - j, j) for j in range(num_steps) if 0 <= d - j < num_blocks]
        cells = []
        for n, j in work:
            x = bank.noise("init", 0, n, block_shape, device) if j == 0 else inputs.pop((j, n))
            more = n < num_blocks - 1
            if not fused:
                t = torch.full((fpb,), ts[j], device=device)
                cells.append(CellChunk(x, t, caches[j], n * fpb, fpb if more else 0, 0))
            elif n == 0:
                t = torch.full((2 * fpb,), ts[j], device=device)
                cells.append(CellChunk(torch.cat([torch.zeros_like(x), x], 1), t, caches[j], -fpb, 0, fpb))
            else:
                prefix, prefix_t = pending.pop(j)
                t = torch.cat([torch.full((fpb,), prefix_t, device=device),
                               torch.full((fpb,), ts[j], device=device)])
                cells.append(CellChunk(torch.cat([prefix, x], 1), t, caches[j], (n - 1) * fpb, fpb, 0))
        rows = len(cells) * context.shape[0]
        start = time.perf_counter()
        v = batched_forward(model, cells, context.repeat(len(cells), 1, 1), fpb,
                            text_kv.setdefault(rows, [None] * model.cfg.num_layers))
        if trace is not None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            trace.append((d, len(cells), start - t0, time.perf_counter() - t0))
        row = 0
        for (n, j), chunk in zip(work, cells):
            b = chunk.x.shape[0]
            cell = denoise_cell(model, chunk.x[:, -fpb:], j, n, context, caches[j], cfg, bank,
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
