"""Sampler orders as small schedules over one primitive (``denoise_chunk``), for inference and training rollouts.

The video is N blocks of f = frames_per_block latent frames, denoised in S steps t_0 = 1000 > t_1 > ... > t_{S-1}
(then 0). The unit of work is the *cell* (block n, step j), ``denoise_cell``: one denoise forward of block n from t_j
attending to the cache (earlier blocks) plus itself -> x0_hat, then the block's next input x at t_{j+1} (x0_hat
re-noised with fresh noise from the bank, or a deterministic Euler step). A cell also names the context that
represents block n to later blocks after step j (at level t_c); a separate no-grad forward writes it to the cache.

Orders (hybrid with k first steps block-first is the general case; k = S is block-first, k = 0 step-first):

* ``block_first`` (Self-Forcing): for n: for j: cell(n, j); then one forward on the clean x0 at t = context_noise
  writes the cache, which persists. Forwards: N*S denoise + (N-1) writes = **N(S+1) - 1**.
* ``step_first`` (HiAR): for j: reset the cache; for n: cell(n, j) and write its context. Block n at step j sees
  blocks < n at t_c = ``context_level``:
    - ``"next"`` (default, t_{j+1}): their re-noised x0_hat, i.e. the very tensors that are their inputs at step
      j+1, written by a forward at t_{j+1}; at the last step the clean x0 at t = context_noise;
    - ``"clean"`` (0): their x0_hat at t = context_noise at every step;
    - ``"current"`` (t_j): their own step-j inputs, whose keys/values the denoise forward writes while denoising
      (no write forwards: one block-causal pass per step in cached form).
  Forwards: **S(2N-1)** for "next"/"clean", **S*N** for "current".
* ``hybrid`` (``hybrid_steps`` = k, 0 < k < S): steps 0..k-1 block-first (each block's context is its input at
  t_k), then steps k..S-1 step-first. Forwards: N*k + (N-1) + (S-k)(2N-1)  [(S-k)*N with "current"]. With k = 1
  this coincides with step-first ("next"): step 0 of step-first already sees earlier blocks at t_1.

The last block never writes (nothing reads it). Each forward covers one block: tokens = forwards * f * tokens per
frame.

Fused writes (``fuse_writes``, one device): a cache write of block n (its clean x0 in block-first, its context at
t_c in step-first) rides in the next forward of block n+1 instead of a forward of its own -- one forward over the
chunk [context of n, input of n+1], block-causal, writing the first f frames (``primitive.fused_velocity``, the same
forward the pipelined sampler and the wavefront fuse with). Block-first then needs **N*S** forwards (108 instead of
134 at 81 frames), step-first "next"/"clean" **S*N** (context_level "current" already writes inside its denoise), each
forward twice as long; the outputs equal the unfused ones up to float rounding. A forward with grad never writes the
cache, so a write that would ride in a grad forward (the exit step of a training rollout) runs on its own.

A prompt switch (``context`` given as {start_block: embeddings}) adds, every time the cache is entered at the
switching block (once for block-first, once per step for step-first), one recache forward per contiguous run of
cached frames (1, or 2 when sink frames are not adjacent to the window) over those frames.

Given frames (``prefix``: clean latents of the first m whole blocks, a continuation's context; src/continuation.py):
blocks 0..m-1 are final before any cell runs and are yielded first. Wherever a sampler order would write a block's
context, a given block is written instead by the same clean-context write as block-first's final write
(``clean_context``: its latents at context_noise, noise ("context", j, n) when > 0) -- once in block-first, at every
step in step-first (the cache is rebuilt per step), so every order continues from block m on the same clean context.
Given blocks run no cells: block-first needs (N-m)S + N-1 forwards, step-first ("next"/"clean") S(2N-1-m). A prompt
switch re-caches given blocks like any other.

Rolling window: the cache keeps the last ``window`` latent frames (plus ``sink`` first frames), so memory for
keys/values is bounded whatever num_frames is; RoPE positions keep growing.

Training rollout (``exit_step`` = j*, shared by all blocks): steps before j* run without grad; at j* the denoise
forward of every block runs with grad (it reads the cache); every cache-write forward runs without grad.
step-first stops after step j* (its contexts at j* follow the rule above, from the detached x0_hat); block-first
stops each block at j*, writes its detached x0_hat at context_noise, then moves on. Both return the x0_hat of all
blocks at j* ([B, F, C, h, w]), carrying grad only through the exit-step forwards. Forwards: as above with S = j*+1,
plus N-1 separate writes at j* for "current" (a forward with grad never writes the cache). ``cache_gradient``
(docs/cache_gradient.md): "detached" -- later blocks read earlier blocks' cached K/V as constants; "official" -- as
the official code, their gradient also flows into the exit-step forward of the block that wrote them (same values).

Noise: see ``src.sampling.noise`` -- block n starts from ("init", 0, n); its re-noising after step j uses
("renoise", j, n); a context at context_noise > 0 after step j uses ("context", j, n). Orders that perform the same
cells therefore consume identical noise: with one block, or with one step, block-first and step-first coincide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from src.flow_matching import NUM_TRAIN_TIMESTEPS, add_noise, warp_steps, x0_from_velocity
from src.models.kv_cache import schedule_slots
from src.sampling.noise import NoiseBank
from src.sampling.primitive import denoise_chunk, frame_timesteps, fused_velocity, next_input, recache, write_context

ORDERS = ("block_first", "step_first", "hybrid")
CONTEXT_LEVELS = ("next", "clean", "current")


@dataclass
class SamplerConfig:
    """Everything a sampler order needs, validated once; the home of every sampler default (conf/sampler/ extends it).

    order: block_first | step_first | hybrid (the module docstring). steps: the student's step list, warped onto the
    shift grid when ``warp`` ([1000, 750, 500, 250] at shift 5 -> 1000, 937.5, 833.3, 625); ``timesteps`` holds the
    result, computed once. window/sink: latent frames, multiples of frames_per_block (window None: unbounded)."""

    order: str = "step_first"
    steps: list[float] = field(default_factory=lambda: [1000.0, 750.0, 500.0, 250.0])
    warp: bool = True
    shift: float = 5.0
    frames_per_block: int = 3
    window: int | None = 21  # rolling window of latent frames (None: unbounded)
    sink: int = 0  # first frames never evicted
    context_level: str = "next"  # next (t_{j+1}) | clean (0) | current (t_j)
    renoise: bool = True  # fresh-noise re-noising (False: the deterministic Euler step)
    context_noise: float = 0.0  # timestep of a clean context write
    hybrid_steps: int = 2  # order "hybrid" only: how many first steps run block-first
    fuse_writes: bool = False  # each cache write rides in the next block's forward (module docstring)

    def __post_init__(self):
        self.steps = tuple(float(s) for s in self.steps)
        if not self.steps:
            raise ValueError("steps must list at least one timestep")
        if self.order not in ORDERS:
            raise ValueError(f"unknown sampler order {self.order!r}; expected one of {ORDERS}")
        if self.hybrid_steps < 0 or (self.order == "hybrid" and self.hybrid_steps > self.num_steps):
            raise ValueError(f"hybrid_steps={self.hybrid_steps} must lie in [0, {self.num_steps}] (the number of steps)")
        ts = tuple(warp_steps(self.steps, self.shift).tolist() if self.warp else self.steps)
        if any(not 0 < t <= NUM_TRAIN_TIMESTEPS for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
            raise ValueError(f"timesteps must decrease strictly within (0, 1000], got {ts}")
        self._timesteps = ts
        if self.frames_per_block < 1:
            raise ValueError("frames_per_block must be >= 1")
        fpb = self.frames_per_block
        if self.window is not None and (self.window <= 0 or self.window % fpb):
            raise ValueError(f"window must be None or a positive multiple of frames_per_block={fpb}, got {self.window}")
        if self.sink < 0 or self.sink % fpb:
            raise ValueError(f"sink must be a non-negative multiple of frames_per_block={fpb}, got {self.sink}")
        if self.context_level not in CONTEXT_LEVELS:
            raise ValueError(f"context_level must be one of {CONTEXT_LEVELS}, got {self.context_level!r}")
        if not 0 <= self.context_noise < NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"context_noise must lie in [0, 1000), got {self.context_noise}")

    @property
    def timesteps(self) -> tuple[float, ...]:
        """The step list the sampler runs (warped when ``warp``)."""
        return self._timesteps

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def block_first_steps(self) -> int:
        """How many first steps run block-first: S for block_first, 0 for step_first, hybrid_steps for hybrid."""
        return {"block_first": self.num_steps, "step_first": 0, "hybrid": self.hybrid_steps}[self.order]

    def with_order(self, order: str | None) -> SamplerConfig:
        """This config under another order (None: itself)."""
        return self if order is None or order == self.order else replace(self, order=order)


def block_contexts(context: torch.Tensor | Mapping[int, torch.Tensor], num_blocks: int) -> list[torch.Tensor]:
    """Text embeddings [B, L, D], or a prompt schedule {start_block: embeddings} -> one (shared) tensor per block."""
    if isinstance(context, torch.Tensor):
        return [context] * num_blocks
    starts = sorted(context)
    if not starts or starts[0] != 0:
        raise ValueError("a prompt schedule must start at block 0")
    if starts[-1] >= num_blocks:
        raise ValueError(f"prompt switch at block {starts[-1]} but the video has only {num_blocks} blocks")
    return [context[max(s for s in starts if s <= n)] for n in range(num_blocks)]


def clean_context(x0: torch.Tensor, step: int, block: int, cfg: SamplerConfig, bank: NoiseBank):
    """Block n's detached x0_hat of step j placed at t = context_noise (noise ("context", j, n) when > 0)."""
    x0 = x0.detach()
    if cfg.context_noise == 0:
        return x0, 0.0
    noise = bank.noise("context", step, block, x0.shape, x0.device, x0.dtype)
    return add_noise(x0, noise, cfg.context_noise), cfg.context_noise


@dataclass
class Cell:
    """The result of cell (block n, step j)."""

    x0: torch.Tensor  # x0_hat, with grad iff the cell ran with grad
    x_next: torch.Tensor | None  # the block's input at step j+1 (None after the last step)
    context: torch.Tensor | None  # what represents block n to later blocks after step j (step-first rule; if write)
    context_t: float | None  # its timestep
    written: bool  # True when the denoise forward already wrote that context ("current", no grad)


def denoise_cell(model, x: torch.Tensor, step: int, block: int, context: torch.Tensor, cache, cfg: SamplerConfig,
                 bank: NoiseBank, *, write: bool = False, grad: bool = False,
                 velocity: torch.Tensor | None = None) -> Cell:
    """Cell (n = block, j = step): denoise x (block n's input at t_j) through ``cache`` and prepare step j+1.

    The per-block primitive for any schedule, including a pipelined sampler with its own cache per step: the noise
    comes from the bank by address, so a cell's result depends only on its input, the cache and the bank.
    ``write``: later blocks will read block n's context, so the cell names it (``cell.context`` at
    ``cell.context_t``); with context_level "current" (and no grad) the denoise forward writes it directly
    (``cell.written``), otherwise the caller writes it with ``write_context`` -- e.g. after sending x_next on, as the
    paper's pipelined DAC schedule does.
    ``velocity``: the cell's velocity from a forward the caller already ran (a fused write + denoise, or a batch of
    cells), which made the cache write the cell's own forward would have made; no forward runs here then.
    """
    ts = cfg.timesteps
    t = ts[step]
    fuse = write and cfg.context_level == "current" and not grad
    if velocity is not None:
        v = velocity
        x0 = x0_from_velocity(x, v, frame_timesteps(t, x).double())
    else:
        with torch.set_grad_enabled(grad):
            x0, v = denoise_chunk(model, x, t, context, cache=cache, start_frame=block * cfg.frames_per_block,
                                  write_cache=fuse)
    x0d = x0.detach()
    last = step == len(ts) - 1
    x_next = None
    if not last:
        noise = bank.noise("renoise", step, block, x.shape, x.device, x.dtype) if cfg.renoise else None
        x_next = next_input(x, x0d, v.detach(), t, ts[step + 1], noise)
    if not write:
        ctx = (None, None)
    elif cfg.context_level == "current":
        ctx = (x, t)
    elif cfg.context_level == "next" and not last:
        ctx = (x_next, ts[step + 1])
    else:
        ctx = clean_context(x0d, step, block, cfg, bank)
    return Cell(x0, x_next, *ctx, written=fuse)


class Rollout:
    """The state of one generation: per-block inputs, the cache and what each cached block was written from."""

    def __init__(self, model, context, num_frames: int, latent_shape: Sequence[int], cfg: SamplerConfig,
                 bank: NoiseBank, exit_step: int | None = None,
                 progress: Callable[[int, int], None] | None = None, cache_gradient: str = "detached",
                 prefix: torch.Tensor | None = None):
        fpb = cfg.frames_per_block
        if num_frames <= 0 or num_frames % fpb:
            raise ValueError(f"num_frames={num_frames} is not a positive multiple of frames_per_block={fpb}")
        if exit_step is not None and not 0 <= exit_step < cfg.num_steps:
            raise ValueError(f"exit_step must lie in [0, {cfg.num_steps}), got {exit_step}")
        self.model, self.cfg, self.bank, self.progress, self.exit_step = model, cfg, bank, progress, exit_step
        self.num_blocks = num_frames // fpb
        self.contexts = block_contexts(context, self.num_blocks)
        self.timesteps = cfg.timesteps
        self.last_step = cfg.num_steps - 1 if exit_step is None else exit_step
        first = self.contexts[0]
        self.block_shape = (first.shape[0], fpb, *latent_shape)
        self.device = first.device
        self.prefix = check_prefix(prefix, self.block_shape, num_frames)
        self.given = 0 if prefix is None else prefix.shape[1] // fpb
        chunk = (2 if cfg.fuse_writes else 1) * fpb
        self.cache = model.new_cache(window=cfg.window, sink=cfg.sink, frames=num_frames,
                                     slots=schedule_slots(cfg.window, cfg.sink, chunk, fpb),
                                     cache_gradient=cache_gradient)
        self.inputs: dict[int, torch.Tensor] = {}
        self.written: dict[int, tuple[torch.Tensor, float]] = {}
        self.pending: tuple[int, torch.Tensor, float] | None = None  # fuse_writes: a write waiting for block n+1

    def input(self, n: int) -> torch.Tensor:
        """Block n's current input; pure noise ("init", 0, n) before its first step."""
        if n in self.inputs:
            return self.inputs.pop(n)
        return self.bank.noise("init", 0, n, self.block_shape, self.device)

    def reset_cache(self):
        if self.pending is not None:
            raise RuntimeError(f"block {self.pending[0]}'s fused cache write is still pending at a cache reset")
        self.cache.reset()
        self.written.clear()

    def enter(self, n: int):
        """Before block n reads the cache: at a prompt switch, rebuild the cached frames under the new prompt."""
        if n == 0 or self.contexts[n] is self.contexts[n - 1] or not self.cache.num_frames:
            return
        fpb = self.cfg.frames_per_block
        blocks = sorted(self.written)
        runs = []
        for b in blocks:
            latents, t = self.written[b]
            t = torch.full(latents.shape[:2], float(t), device=latents.device)
            if runs and runs[-1][0] + len(runs[-1][1]) == b:
                runs[-1][1].append(latents)
                runs[-1][2].append(t)
            else:
                runs.append((b, [latents], [t]))
        recache(self.model, self.cache, [(b * fpb, torch.cat(xs, 1), torch.cat(ts, 1)) for b, xs, ts in runs],
                self.contexts[n], fpb)

    def _record(self, n: int, latents: torch.Tensor, t: float):
        self.written[n] = (latents, t)
        kept = {f // self.cfg.frames_per_block for f in self.cache.frames}
        self.written = {b: v for b, v in self.written.items() if b in kept}

    def cell(self, step: int, n: int, x: torch.Tensor, write: bool) -> Cell:
        grad = step == self.exit_step
        velocity = None
        writes_itself = write and self.cfg.context_level == "current" and not grad  # its denoise forward writes block n
        if self.pending is not None and (grad or self.pending[0] != n - 1 or writes_itself):
            self.flush()  # a grad forward never writes the cache; a fused forward writes only the pending block
        if self.pending is not None:  # block n-1's write rides in this forward
            prev, latents, t = self.pending
            self.pending = None
            velocity = fused_velocity(self.model, latents, t, x, self.timesteps[step], self.contexts[n], self.cache,
                                      n, self.cfg.frames_per_block)
            self._record(prev, latents, t)
        cell = denoise_cell(self.model, x, step, n, self.contexts[n], self.cache, self.cfg, self.bank, write=write,
                            grad=grad, velocity=velocity)
        if cell.written:
            self._record(n, cell.context, cell.context_t)
        if self.progress is not None:
            self.progress(step, n)
        return cell

    def write(self, n: int, latents: torch.Tensor, t: float):
        """Block n's cache write: now, or (fuse_writes) inside block n+1's next forward."""
        self.flush()
        if self.cfg.fuse_writes:
            self.pending = (n, latents, t)
            return
        write_context(self.model, latents, t, self.contexts[n], self.cache, n * self.cfg.frames_per_block)
        self._record(n, latents, t)

    def write_given(self, n: int, step: int):
        """Given block n enters the cache as the sampler's own final blocks do: the clean-context write."""
        f = self.cfg.frames_per_block
        self.write(n, *clean_context(self.prefix[:, n * f:(n + 1) * f], step, n, self.cfg, self.bank))

    def flush(self):
        """Run a pending fused write as a forward of its own (the next forward cannot carry it)."""
        if self.pending is not None:
            n, latents, t = self.pending
            self.pending = None
            write_context(self.model, latents, t, self.contexts[n], self.cache, n * self.cfg.frames_per_block)
            self._record(n, latents, t)


def check_prefix(prefix: torch.Tensor | None, block_shape: Sequence[int], num_frames: int) -> torch.Tensor | None:
    """Given frames [B, m*f, C, h, w]: whole blocks of the video's batch and latent shape, leaving a block to sample."""
    if prefix is None:
        return None
    b, f, *latent = block_shape
    if prefix.dim() != 5 or prefix.shape[0] != b or list(prefix.shape[2:]) != latent:
        raise ValueError(f"given frames must be [{b}, m * {f}, {', '.join(map(str, latent))}], "
                         f"got {tuple(prefix.shape)}")
    k = prefix.shape[1]
    if k == 0 or k % f or k >= num_frames:
        raise ValueError(f"{k} given frames: need a positive multiple of the block size {f} below num_frames="
                         f"{num_frames}")
    return prefix.detach()


def _block_first_phase(r: Rollout, num_steps: int) -> Iterator[tuple[int, torch.Tensor]]:
    """for n: for j < num_steps: cell(n, j); write block n's state for later blocks (clean x0 when final)."""
    stop = min(num_steps, r.last_step + 1)
    final = stop == r.last_step + 1
    for n in range(r.num_blocks):
        r.enter(n)
        if n < r.given:
            r.write_given(n, stop - 1)
            continue
        x = r.input(n)
        for j in range(stop):
            cell = r.cell(j, n, x, write=False)
            x = cell.x_next
        if final:
            yield n, cell.x0
        else:
            r.inputs[n] = x
        if n < r.num_blocks - 1:
            r.write(n, *(clean_context(cell.x0, stop - 1, n, r.cfg, r.bank) if final else (x, r.timesteps[stop])))


def _step_first_phase(r: Rollout, first_step: int) -> Iterator[tuple[int, torch.Tensor]]:
    """for j >= first_step: reset the cache; for n: cell(n, j), then write its context for blocks > n."""
    for j in range(first_step, r.last_step + 1):
        r.reset_cache()
        for n in range(r.num_blocks):
            r.enter(n)
            if n < r.given:
                r.write_given(n, j)
                continue
            more = n < r.num_blocks - 1
            cell = r.cell(j, n, r.input(n), write=more)
            if j == r.last_step:
                yield n, cell.x0
            else:
                r.inputs[n] = cell.x_next
            if more and not cell.written:
                r.write(n, cell.context, cell.context_t)


def forward_count(cfg: SamplerConfig, num_blocks: int, exit_step: int | None = None) -> int:
    """The number of model forwards (each over one block) ``cfg.order`` performs without prompt switches."""
    k, n = cfg.block_first_steps, num_blocks
    steps_run = cfg.num_steps if exit_step is None else exit_step + 1
    # block-first writes ride in the next block's first cell (step 0) unless that cell has grad
    block_first_writes = 0 if cfg.fuse_writes and exit_step != 0 else n - 1
    block_first_part = n * min(k, steps_run) + block_first_writes if k else 0
    m = max(0, steps_run - k)  # step-first steps
    grad_step_writes = n - 1 if exit_step is not None and m else 0  # writes beside a grad exit step's denoises
    if cfg.context_level != "current" and not cfg.fuse_writes:
        writes = m * (n - 1)
    else:  # fused into the denoise forwards, except at a (grad) exit step
        writes = grad_step_writes
    return block_first_part + m * n + writes


def generate_blocks(model, context, num_frames: int, latent_shape: Sequence[int], cfg: SamplerConfig,
                    bank: NoiseBank, *, order: str | None = None, exit_step: int | None = None,
                    progress: Callable[[int, int], None] | None = None,
                    cache_gradient: str = "detached",
                    prefix: torch.Tensor | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (block index, x0_hat [B, f, C, h, w]) in block order as soon as each block is final.

    context: text embeddings [B, L, D] or a prompt schedule {start_block: embeddings}. latent_shape: (C, h, w).
    order: overrides ``cfg.order`` for this call. progress(step, block) is called after every denoise cell.
    cache_gradient: a training rollout's gradient through the cached K/V (module docstring).
    prefix: given frames (clean latents [B, m*f, C, h, w]) that are blocks 0..m-1, yielded first as they are; the
    sampler continues from block m (module docstring).
    """
    cfg = cfg.with_order(order)
    k = cfg.block_first_steps
    r = Rollout(model, context, num_frames, latent_shape, cfg, bank, exit_step, progress, cache_gradient, prefix)
    f = cfg.frames_per_block
    for n in range(r.given):
        yield n, r.prefix[:, n * f:(n + 1) * f]
    if k:
        yield from _block_first_phase(r, k)
    if k <= r.last_step:
        yield from _step_first_phase(r, k)


def sample(model, context, num_frames: int, latent_shape: Sequence[int], cfg: SamplerConfig, bank: NoiseBank, *,
           order: str | None = None, exit_step: int | None = None,
           progress: Callable[[int, int], None] | None = None, cache_gradient: str = "detached",
           prefix: torch.Tensor | None = None) -> torch.Tensor:
    """The whole video [B, num_frames, C, h, w] (x0_hat at the exit step when exit_step is given), starting with the
    given frames ``prefix`` when given."""
    blocks = generate_blocks(model, context, num_frames, latent_shape, cfg, bank, order=order, exit_step=exit_step,
                             progress=progress, cache_gradient=cache_gradient, prefix=prefix)
    return torch.cat([x0 for _, x0 in blocks], dim=1)
