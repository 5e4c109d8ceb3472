"""A wall-time model of the sampler orders: predicted total time and first-block latency from a forward cost and a
transfer time.

Forward cost (``ForwardCost``): one forward whose chunk has q latent frames and attends to k key frames (cached
frames plus the chunk) costs ``a + rows * (b*q + c*q*k)`` seconds -- a fixed overhead, the per-frame work
(projections, FFN, text attention) and the self-attention term; ``rows`` counts batch rows (cells of a batched
forward times the video batch). Fitted to measured forwards (``fit_forward_cost``) or derived from FLOPs at an
assumed throughput (``flop_forward_cost``).

Each order is a program of forwards on devices -- exactly the order the code runs (orders.py for block-first and
step-first, pipeline.stage_cells plus the DAC rule for pipelined(P), one batched forward per tick for the
wavefront) -- and is simulated by list scheduling: a device runs its ops in program order; an op starts when its
device is free and its inputs exist, plus ``transfer_s`` for an input made on another device. ``cores`` caps how
many ops run at once (P CPU processes sharing fewer cores).

Key frames per forward follow the cache rule: a chunk starting at frame s sees the cached frames before s that the
rolling window (and sink) keep.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from src.models.wan import WanConfig
from src.sampling.orders import SamplerConfig
from src.sampling.pipeline import split_steps, stage_cells


@dataclass
class ForwardCost:
    a: float  # seconds per forward
    b: float  # seconds per query frame per row
    c: float  # seconds per query frame x key frame per row

    def __call__(self, q: int, k: int, rows: int = 1) -> float:
        return self.a + rows * (self.b * q + self.c * q * k)


def fit_forward_cost(samples: Sequence[tuple[int, int, int, float]]) -> ForwardCost:
    """Least squares on measured (q, k, rows, seconds) samples; at least three distinct (q, k, rows)."""
    if len({s[:3] for s in samples}) < 3:
        raise ValueError("fitting a forward cost needs at least three distinct (q, k, rows) measurements")
    a_mat = torch.tensor([[1.0, r * q, r * q * k] for q, k, r, _ in samples], dtype=torch.float64)
    y = torch.tensor([s[3] for s in samples], dtype=torch.float64)
    coef = torch.linalg.lstsq(a_mat, y[:, None]).solution[:, 0].clamp(min=0)
    return ForwardCost(*coef.tolist())


def forward_flops(cfg: WanConfig, tokens_per_frame: int) -> tuple[float, float]:
    """(FLOPs per query frame, FLOPs per query frame x key frame) of one DiT forward with text keys/values cached:
    per layer and token 8 d^2 (self q,k,v,o) + 4 d^2 (cross q,o) + 4 d ffn (FFN) + 4 L_text d (text attention),
    plus 4 d per key token (scores and weighted sum)."""
    d, layers, tpf = cfg.dim, cfg.num_layers, tokens_per_frame
    per_token = 12 * d * d + 4 * d * cfg.ffn_dim + 4 * cfg.text_len * d
    return layers * per_token * tpf, layers * 4 * d * tpf * tpf


def flop_forward_cost(cfg: WanConfig, tokens_per_frame: int, flops_per_s: float, overhead_s: float) -> ForwardCost:
    per_q, per_qk = forward_flops(cfg, tokens_per_frame)
    return ForwardCost(overhead_s, per_q / flops_per_s, per_qk / flops_per_s)


def context_frames(start: int, window: int | None, sink: int) -> int:
    """Cached frames a chunk starting at ``start`` attends to when all earlier frames were written in order."""
    if window is None:
        return start
    return min(start, window) + min(sink, max(0, start - window))


@dataclass
class Op:
    device: int
    seconds: float
    deps: tuple[int, ...] = ()  # indices of earlier ops whose results this op needs


def simulate(ops: list[Op], transfer_s: float = 0.0, cores: int | None = None) -> list[float]:
    """End time of every op: list scheduling, program order per device, at most ``cores`` ops at a time."""
    programs: dict[int, list[int]] = {}
    for i, op in enumerate(ops):
        programs.setdefault(op.device, []).append(i)
    nxt = dict.fromkeys(programs, 0)
    device_free = dict.fromkeys(programs, 0.0)
    core_free = [0.0] * (cores or len(programs))
    end: dict[int, float] = {}
    while len(end) < len(ops):
        best = None
        for dev, prog in programs.items():
            if nxt[dev] == len(prog):
                continue
            i = prog[nxt[dev]]
            if any(d not in end for d in ops[i].deps):
                continue
            ready = max([device_free[dev]] + [end[d] + (transfer_s if ops[d].device != dev else 0.0)
                                              for d in ops[i].deps])
            if best is None or ready < best[0]:
                best = (ready, dev, i)
        if best is None:
            raise ValueError("the op program deadlocks (a dependency comes later in its device's program)")
        ready, dev, i = best
        core = min(range(len(core_free)), key=core_free.__getitem__)
        start = max(ready, core_free[core])
        end[i] = start + ops[i].seconds
        core_free[core] = device_free[dev] = end[i]
        nxt[dev] += 1
    return [end[i] for i in range(len(ops))]


@dataclass
class Prediction:
    total_s: float
    first_block_s: float
    forwards: int

    def to_dict(self) -> dict:
        return asdict(self)


ORDERS = ("block_first", "step_first", "pipelined", "wavefront")


class ScheduleModel:
    """Programs and predictions of each order for N blocks under a SamplerConfig (steps, frames_per_block, window,
    sink, context_level)."""

    def __init__(self, cost: ForwardCost, cfg: SamplerConfig, num_blocks: int, batch: int = 1,
                 transfer_s: float = 0.0):
        self.cost, self.cfg, self.num_blocks, self.batch, self.transfer_s = cost, cfg, num_blocks, batch, transfer_s

    def _fwd(self, q: int, start: int) -> float:
        k = context_frames(start, self.cfg.window, self.cfg.sink) + q
        return self.cost(q, k, self.batch)

    def program(self, order: str, processes: int = 1, fuse: bool = False) -> tuple[list[Op], list[int]]:
        """(ops in each device's program order, index of the op that finalises each block)."""
        if order not in ORDERS:
            raise ValueError(f"unknown order {order!r}; expected one of {ORDERS}")
        if (processes != 1 or fuse) and order != "pipelined":
            raise ValueError("processes and fuse apply to the pipelined order only")
        return getattr(self, f"_{order}")(processes, fuse)

    def predict(self, order: str, processes: int = 1, fuse: bool = False, cores: int | None = None,
                seconds: Sequence[float] | None = None) -> Prediction:
        """Simulated total and first-block time. ``seconds`` replaces the modelled op durations (in the order of
        ``program``), e.g. with the forward times measured in a run, to check the schedule alone."""
        ops, final = self.program(order, processes, fuse)
        if seconds is not None:
            if len(seconds) != len(ops):
                raise ValueError(f"{len(seconds)} durations for a program of {len(ops)} ops")
            ops = [Op(op.device, float(t), op.deps) for op, t in zip(ops, seconds)]
        end = simulate(ops, self.transfer_s, cores)
        return Prediction(max(end), end[final[0]], len(ops))

    def _block_first(self, processes: int, fuse: bool):
        f, s, n_blocks = self.cfg.frames_per_block, self.cfg.num_steps, self.num_blocks
        ops, final = [], []
        for n in range(n_blocks):
            ops += [Op(0, self._fwd(f, n * f)) for _ in range(s)]
            final.append(len(ops) - 1)
            if n < n_blocks - 1:
                ops.append(Op(0, self._fwd(f, n * f)))
        return ops, final

    def _step_first(self, processes: int, fuse: bool):
        f, s, n_blocks = self.cfg.frames_per_block, self.cfg.num_steps, self.num_blocks
        separate_write = self.cfg.context_level != "current"
        ops, final = [], []
        for j in range(s):
            for n in range(n_blocks):
                ops.append(Op(0, self._fwd(f, n * f)))
                if j == s - 1:
                    final.append(len(ops) - 1)
                if separate_write and n < n_blocks - 1:
                    ops.append(Op(0, self._fwd(f, n * f)))
        return ops, final

    def _pipelined(self, processes: int, fuse: bool):
        """pipeline.py's program: stage_cells order per process, denoise (or fused write + denoise), then the
        separate write (DAC); (n, j) needs (n, j-1) (another process's when j is its first step)."""
        f, s, n_blocks = self.cfg.frames_per_block, self.cfg.num_steps, self.num_blocks
        separate_write = self.cfg.context_level != "current"
        ops, made, final = [], {}, []
        for rank, steps in enumerate(split_steps(s, processes)):
            for n, j in stage_cells(steps, n_blocks):
                deps = (made[(n, j - 1)],) if j > 0 else ()
                if fuse and separate_write and n > 0:
                    ops.append(Op(rank, self._fwd(2 * f, (n - 1) * f), deps))
                else:
                    ops.append(Op(rank, self._fwd(f, n * f), deps))
                made[(n, j)] = len(ops) - 1
                if j == s - 1:
                    final.append(len(ops) - 1)
                if separate_write and not fuse and n < n_blocks - 1:
                    ops.append(Op(rank, self._fwd(f, n * f)))
        return ops, final

    def _wavefront(self, processes: int, fuse: bool):
        """wavefront.py: one batched forward per tick over its cells (2f-frame fused chunks, or f with "current"),
        context padded to the longest cell's."""
        f, s, n_blocks = self.cfg.frames_per_block, self.cfg.num_steps, self.num_blocks
        fused = self.cfg.context_level != "current"
        q = 2 * f if fused else f
        ops = []
        for d in range(n_blocks + s - 1):
            blocks = [d - j for j in range(s) if 0 <= d - j < n_blocks]
            start = max(max(n - 1, 0) * f if fused else n * f for n in blocks)
            k = context_frames(start, self.cfg.window, self.cfg.sink) + q
            ops.append(Op(0, self.cost(q, k, len(blocks) * self.batch)))
        return ops, list(range(s - 1, len(ops)))

    def all(self, processes: Sequence[int] = (), cores: int | None = None) -> dict:
        """Predictions of block-first, step-first, the wavefront and pipelined(P) (and fused) for each P."""
        out = {order: self.predict(order).to_dict() for order in ("block_first", "step_first", "wavefront")}
        for p in processes:
            out[f"pipelined_{p}"] = self.predict("pipelined", p, cores=cores).to_dict()
            if self.cfg.context_level != "current":
                out[f"pipelined_{p}_fused"] = self.predict("pipelined", p, fuse=True, cores=cores).to_dict()
        return out
