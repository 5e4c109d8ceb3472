"""Single-device wavefront: the pipelined step-first schedule on one device, one batched forward per tick.

At tick d the ready cells are (n, j) with n + j = d, one per step j (each step keeps its own KV cache, as a pipeline
stage does). All of them run in **one** forward, each cell a group of batch rows with its own timesteps, its own cache
and its own attention mask, fused with the cache write of its step's previous block (the paper's fusion; with
context_level "current" the chunk writes itself instead). Blocks stream out from tick S-1 on: the first block
after S forwards instead of (S-1)(2N-1) + 1 for the step-first loop, N + S - 1 forwards in all.

How the cells share one forward (the batched-cache extension, here rather than in the model):

* caches: each cell's cached frames are stacked along the batch, right-padded with zero keys/values to the longest
  one; a per-row boolean mask [rows, 1, Lq, Lk] (true frame indices, block-causal inside the chunk, rolling window
  and sink as in the model) hides the padding and everything the cell may not see. Writes go to each step's own
  ``KVCache`` (its eviction rule unchanged).
* positions: the model applies one RoPE table to all rows, but the cells of a tick sit at different frames. RoPE
  attention depends only on frame *differences*, so every step's keys are rotated with a constant per-step frame
  offset, chosen so that all chunks of a tick start at the same virtual frame d*f. Masks and the cache bookkeeping
  use true frames. This is exact in real arithmetic; in floating point the result equals the step-first sampler up
  to rounding (at most 2.4e-7 on the toy model; tests use 1e-5), not bit for bit -- batching and padding change the
  reductions anyway.
* chunks: with fusion every chunk is [context of block n-1, block n] (2f frames); block 0 has no context, so a dummy
  prefix that no real query sees (and that sees only itself) keeps the chunks the same length.

``batched_forward`` mirrors ``WanDiT.forward`` (embeddings, blocks, head) with these per-row masks and the stacked
cache; the equality test against ``schedules.sample(order="step_first")`` guards it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from src.models.wan import KVCache, frame_visibility, rope_cos_sin, sinusoidal_embedding
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


class _Stacked:
    """cache.keys / cache.values of a stacked cache: per layer, every cell's context keys, zero-padded, stacked."""

    def __init__(self, cells: list[CellChunk], counts: list[int], tpf: int, attr: str):
        self.cells, self.counts, self.tpf, self.attr = cells, counts, tpf, attr

    def __getitem__(self, layer: int) -> torch.Tensor:
        width = max(self.counts) * self.tpf
        like = next(getattr(c.cache, self.attr)[layer] for c, k in zip(self.cells, self.counts) if k)
        parts = []
        for cell, count in zip(self.cells, self.counts):
            rows = cell.x.shape[0]
            part = like.new_zeros(rows, width, *like.shape[2:])
            if count:
                part[:, : count * self.tpf] = getattr(cell.cache, self.attr)[layer][:, : count * self.tpf]
            parts.append(part)
        return torch.cat(parts, dim=0)


class StackedCache:
    """The cache interface the DiT's attention layers use (keys, values, apply_write, text_kv), over several cells'
    caches at once; ``text_kv`` is shared by the forwards of equal batch composition."""

    def __init__(self, cells: list[CellChunk], counts: list[int], tpf: int, text_kv: list):
        self.cells, self.text_kv = cells, text_kv
        self.keys = _Stacked(cells, counts, tpf, "keys")
        self.values = _Stacked(cells, counts, tpf, "values")
        self.rows = []
        row = 0
        for cell in cells:
            self.rows.append(slice(row, row + cell.x.shape[0]))
            row += cell.x.shape[0]

    def apply_write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        for cell, rows in zip(self.cells, self.rows):
            if cell.write:
                cell.cache.apply_write(layer, k[rows], v[rows])


def _cell_mask(cell: CellChunk, count: int, width: int, fpb: int) -> torch.Tensor:
    """Frame-level visibility [F, width + F] of one cell: its first ``count`` context frames, padding up to width,
    then the chunk (block-causal in blocks of fpb from the chunk start)."""
    cache, n_frames = cell.cache, cell.x.shape[1]
    query = torch.arange(cell.start, cell.start + n_frames)
    keys = torch.cat([torch.tensor(cache.context_frames(cell.start), dtype=torch.long), query])
    vis = frame_visibility(query, keys, cell.start, n_frames, fpb, cache.window, cache.sink)
    if cell.dummy:
        vis[cell.dummy:, count:count + cell.dummy] = False
    mask = torch.zeros(n_frames, width + n_frames, dtype=torch.bool)
    mask[:, :count] = vis[:, :count]
    mask[:, width:] = vis[:, count:]
    return mask


def batched_forward(model, cells: list[CellChunk], context: torch.Tensor, virtual_start: int, fpb: int,
                    text_kv: list) -> torch.Tensor:
    """One no-grad forward over several cells (equal chunk lengths): velocity [sum of rows, F, C, h, w].

    ``context``: text embeddings for all rows; ``text_kv``: per-layer text keys/values for this row layout (a list of
    None filled on first use)."""
    x = torch.cat([c.x for c in cells], dim=0)
    b, n_frames, _, height, width = x.shape
    cfg = model.cfg
    _, ph, pw = cfg.patch_size
    h, w = height // ph, width // pw
    tpf = h * w
    counts = [len(c.cache.context_frames(c.start)) for c in cells]
    ctx_width = max(counts)
    frame_masks = [_cell_mask(c, k, ctx_width, fpb) for c, k in zip(cells, counts)]
    mask = torch.cat([m.repeat_interleave(tpf, 0).repeat_interleave(tpf, 1)[None].expand(c.x.shape[0], -1, -1)
                      for m, c in zip(frame_masks, cells)], dim=0)[:, None].to(x.device)
    t = torch.cat([c.t[None].expand(c.x.shape[0], -1) for c in cells], dim=0).to(device=x.device, dtype=torch.float32)
    for c in cells:
        if c.write:
            c.cache.plan_write(c.start, c.write, tpf)
    stacked = StackedCache(cells, counts, tpf, text_kv)

    with torch.no_grad():  # as WanDiT.forward, with per-row masks and the stacked cache
        dtype = model.patch_embedding.weight.dtype
        tokens = model.patch_embedding(x.to(dtype).permute(0, 2, 1, 3, 4)).flatten(2).transpose(1, 2).float()
        emb = sinusoidal_embedding(cfg.freq_dim, t).to(model.time_embedding[0].weight.dtype)
        e = model.time_embedding(emb).float()
        e0 = model.time_projection(e.to(dtype)).float().unflatten(1, (6, cfg.dim))
        e, e0 = e.view(b, n_frames, -1), e0.view(b, n_frames, 6, -1)
        rope = rope_cos_sin(cfg.head_dim, torch.arange(virtual_start, virtual_start + n_frames, device=x.device), h, w)
        text = None if text_kv[0] is not None else model.embed_text(context)
        write = any(c.write for c in cells)
        for i, block in enumerate(model.blocks):
            tokens = block(tokens, e0, text, rope, mask, stacked, i, ctx_width, tpf, write)
        out = model.head(tokens, e)
    for c in cells:
        if c.write:
            c.cache.commit_write()
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
                cells.append(CellChunk(x, torch.full((fpb,), ts[j]), caches[j], n * fpb, fpb if more else 0, 0))
            elif n == 0:
                cells.append(CellChunk(torch.cat([torch.zeros_like(x), x], 1), torch.full((2 * fpb,), ts[j]),
                                       caches[j], -fpb, 0, fpb))
            else:
                prefix, prefix_t = pending.pop(j)
                t = torch.tensor([prefix_t] * fpb + [ts[j]] * fpb)
                cells.append(CellChunk(torch.cat([prefix, x], 1), t, caches[j], (n - 1) * fpb, fpb, 0))
        rows = len(cells) * context.shape[0]
        start = time.perf_counter()
        v = batched_forward(model, cells, context.repeat(len(cells), 1, 1), d * fpb, fpb,
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
