"""The KV cache of the cached attention mode: earlier frames' self-attention keys/values, per layer, in place.

``KVCache`` plans with Python ints (which frame lives in which slot, what a rolling window evicts) and holds one
preallocated slab per layer; ``src.models.attention.ChunkAttention`` reads and writes it during a forward.
"""

from __future__ import annotations

import torch

CACHE_GRADIENTS = ("detached", "official")


class CacheChanged(RuntimeError):
    """A checkpointed forward's recompute would read cache slots that were overwritten since its forward."""


class GradTap(torch.autograd.Function):
    """Zeros shaped like x, without storage (an expanded scalar), whose gradient goes to x. Added to a value read from
    the slab it keeps that value bit for bit and routes its gradient into x: the straight-through link of
    ``cache_gradient="official"`` (value: the slab's context K/V; gradient path: the exit-step forward's K/V)."""

    @staticmethod
    def forward(ctx, x):
        return x.new_zeros(()).expand(x.shape)

    @staticmethod
    def backward(ctx, grad):
        return grad


class KVCache:
    """Self-attention keys/values of earlier latent frames, per layer, plus the text keys/values.

    Storage: one preallocated slab per layer, [B, slots * tokens_per_frame, heads, head_dim], written in place. Sink
    frames 0 .. sink-1 live in slots 0 .. sink-1; every other frame f in slot f - base (the rolling offset). The cached
    frames are the sink frames written so far plus one contiguous run [run_start, run_end). When a chunk does not fit
    after the run, the frames it may still see are moved to just after the sinks (a copy of at most ``window`` frames,
    amortised over the slots beyond what a forward needs); the slab grows only while no window bounds it. ``slots``
    (``schedule_slots``): the slab's size when the schedule knows its widest forward; otherwise sink + 2 * window.
    Keys are stored after RoPE at their absolute frame positions, so a block's visible frames are one contiguous slot
    range (two with sinks).

    A write overwrites frames it already holds; with a rolling ``window`` of W frames (plus ``sink`` first frames
    that are never evicted) frames older than ``latest_end - W`` are evicted. Cross-attention keys/values are computed
    once per text context. ``slot_version`` counts writes per slot: a forward that reads the cache with grad records
    the versions it read, and its checkpointed recompute raises ``CacheChanged`` instead of using other values.

    ``cache_gradient`` (docs/cache_gradient.md): "detached" -- cached K/V are constants for the backward; "official"
    -- as the official training code: a forward with grad leaves a ``GradTap`` of its own K/V per frame and layer
    (``grad_taps``, no storage), and a later forward with grad reads each such frame as slab value + tap, so gradient
    flows into the exit-step forward that produced those frames' K/V while the values stay the slab's. Taps live until
    ``reset``.
    """

    def __init__(self, num_layers: int, window: int | None = None, sink: int = 0, frames: int | None = None,
                 slots: int | None = None, cache_gradient: str = "detached"):
        if cache_gradient not in CACHE_GRADIENTS:
            raise ValueError(f"cache_gradient must be one of {CACHE_GRADIENTS}, got {cache_gradient!r}")
        self.cache_gradient = cache_gradient
        if window is not None and window <= 0:
            raise ValueError("window must be a positive number of frames or None")
        if sink < 0:
            raise ValueError("sink must be >= 0")
        self.num_layers, self.window, self.sink = num_layers, window, sink
        self.max_frames = frames  # the video's length when known: the slabs never need more slots
        if slots is not None and slots < max(sink, 1):
            raise ValueError(f"slots must hold at least the sink frames and one more, got {slots}")
        self.slots = slots  # the slab's frame slots when the schedule knows them (schedule_slots); else grown lazily
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.capacity = 0  # slots (frames) of the slabs; they are (re)allocated to it lazily, per layer
        self.slot_version: list[int] = []
        self.tpf: int | None = None
        self.reset()
        self.reset_text()

    def reset(self):
        """Forget every self-attention frame (the slabs and the text keys/values stay)."""
        self.sink_frames: list[int] = []
        self.run_start = self.run_end = 0
        self.base = 0
        self.pinned = False  # a grad forward read slots: move nothing until the next reset
        self.grad_taps: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(self.num_layers)]

    def reset_text(self):
        """Forget the text keys/values (call at a prompt switch)."""
        self.text_source = None
        self.text_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * self.num_layers

    @property
    def frames(self) -> list[int]:
        return self.sink_frames + list(range(self.run_start, self.run_end))

    @property
    def num_frames(self) -> int:
        return len(self.sink_frames) + self.run_end - self.run_start

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def is_sink(self, f: int) -> bool:
        return 0 <= f < self.sink

    def slot(self, f: int) -> int:
        return f if self.is_sink(f) else f - self.base

    # ---- planning (Python ints only)

    def _run_part(self, lo: int, hi: int) -> tuple[int, int]:
        """The non-sink frames of [lo, hi) (a chunk never mixes negative and sink frames, see ``place``)."""
        if self.sink and lo < self.sink and hi > 0:
            return max(lo, self.sink), max(hi, self.sink)
        return lo, hi

    def _ensure_capacity(self, slots: int):
        if slots > self.capacity:
            grown = max(2 * self.capacity, self.sink + 2 * (self.window or 0))
            if self.slots is not None and self.capacity < self.slots:  # first allocation: what the schedule needs
                grown = self.slots
            self.capacity = max(slots, min(grown, self.max_frames or grown))
            self.slot_version += [0] * (self.capacity - len(self.slot_version))

    def _compact(self, keep_from: int):
        """Move run frames [keep_from, run_end) to the slots right after the sinks (all layers), drop older ones."""
        keep_from = max(keep_from, self.run_start)
        new_base = keep_from - self.sink
        if new_base == self.base:
            return
        src, n = self.slot(keep_from), max(0, self.run_end - keep_from)
        if n:
            tpf = self.tpf
            for slabs in (self.keys, self.values):
                for t in slabs:
                    if t is not None:
                        t[:, self.sink * tpf:(self.sink + n) * tpf] = t[:, src * tpf:(src + n) * tpf].clone()
            for s in range(self.sink, self.sink + n):
                self.slot_version[s] += 1
        self.base = new_base
        self.run_start, self.run_end = keep_from, max(self.run_end, keep_from)

    def place(self, lo: int, hi: int, first_visible: int | None, write_lo: int, write_hi: int) -> bool:
        """Make slots for frames [lo, hi) (a chunk; [write_lo, write_hi) of it will be committed). Returns whether
        the chunk's slots are one contiguous range after the cached frames it may see (in-place writing possible)."""
        if write_hi > write_lo and write_lo < 0 and self.sink:
            raise ValueError("negative frames cannot be written to a cache with sink frames")
        w0, w1 = self._run_part(write_lo, write_hi)
        if w1 > w0 and self.run_end > self.run_start:
            if w0 > self.run_end:
                latest = max(w1, self.run_end)
                if self.window is not None and self.run_end <= latest - self.window:
                    self.run_start = self.run_end  # every cached run frame is evicted by this write
                else:
                    raise ValueError(f"KV cache: writing frames [{write_lo}, {write_hi}) would leave a gap after the "
                                     f"cached frames [{self.run_start}, {self.run_end})")
            elif w0 < self.run_start:
                raise ValueError(f"KV cache: frames [{write_lo}, {write_hi}) start before the cached run "
                                 f"[{self.run_start}, {self.run_end}) (they were evicted)")
        r0, r1 = self._run_part(lo, hi)
        if self.run_end == self.run_start:  # an empty run: rebase so the chunk's run part starts right after sinks
            self.base = r0 - self.sink
            self.run_start = self.run_end = r0
        if r1 - self.base > self.capacity and not self.pinned and first_visible is not None and r0 >= self.run_start:
            self._compact(max(self.run_start, min(first_visible, r0)))  # what this chunk may still see
        self._ensure_capacity(max(r1 - self.base, self.sink, self.slot(hi - 1) + 1 if hi > lo else 0))
        contiguous = self.slot(hi - 1) - self.slot(lo) == hi - lo - 1 and self.slot(lo) >= 0
        if lo < 0 < hi and self.sink:
            contiguous = False
        if not self.is_sink(lo) and self.slot(lo) < self.sink:
            contiguous = False
        scratch = [f for f in self.frames if write_hi <= f < hi or (lo <= f < write_lo)]
        return contiguous and not scratch

    def cached_before(self, start: int, first_visible: int | None) -> list[int]:
        """Cached frames a chunk starting at ``start`` may read: before it, and not older than any of its blocks may
        see (sinks excepted)."""
        return [f for f in self.frames if f < start and (first_visible is None or f >= first_visible or self.is_sink(f))]

    def commit(self, lo: int, hi: int):
        """Frames [lo, hi) were written to their slots: add them and evict by the window rule."""
        if hi <= lo:
            return
        self.sink_frames = sorted(set(self.sink_frames) | {f for f in range(lo, hi) if self.is_sink(f)})
        r0, r1 = self._run_part(lo, hi)
        if r1 > r0:
            if self.run_end == self.run_start:
                self.run_start, self.run_end = r0, r1
            else:
                self.run_end = max(self.run_end, r1)
        latest = max(self.frames) + 1
        if self.window is not None:
            self.run_start = min(max(self.run_start, latest - self.window), self.run_end)

    # ---- tensors

    def held(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys/values of the cached frames, in frame order ([B, frames * tpf, H, D] copies; for inspection)."""
        tpf = self.tpf
        runs = frame_runs([self.slot(f) for f in self.frames])
        return tuple(torch.cat([slab[:, lo * tpf:hi * tpf] for lo, hi in runs], 1)
                     for slab in (self.keys[layer], self.values[layer]))

    def slabs(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's key/value slabs, allocated (zeros) or grown to ``capacity`` slots like ``like`` [B, L, H, D]."""
        b, _, heads, dim = like.shape
        size = self.capacity * self.tpf
        for slabs in (self.keys, self.values):
            old = slabs[layer]
            if old is not None and old.shape[0] == b and old.shape[2:] == like.shape[2:] and old.shape[1] >= size:
                continue
            if old is not None and (old.shape[0] != b or old.shape[2:] != like.shape[2:]) and self.num_frames:
                raise ValueError(f"KV cache holds batch {old.shape[0]} x {tuple(old.shape[2:])}, "
                                 f"got {b} x {tuple(like.shape[2:])}")
            new = torch.zeros(b, size, heads, dim, dtype=like.dtype, device=like.device)
            if old is not None and old.shape[0] == b and old.shape[2:] == like.shape[2:]:
                new[:, : old.shape[1]] = old
            slabs[layer] = new
        return self.keys[layer], self.values[layer]

    def tap(self, layer: int, frame_lo: int, k: torch.Tensor, v: torch.Tensor):
        """Leave a GradTap of k/v (whole frames from frame_lo on, with grad) per frame ("official" only)."""
        tpf = self.tpf
        for i in range(k.shape[1] // tpf):
            part = slice(i * tpf, (i + 1) * tpf)
            self.grad_taps[layer][frame_lo + i] = (GradTap.apply(k[:, part]), GradTap.apply(v[:, part]))

    def read(self, layer: int, slots: tuple[int, int], frames: list[int], dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The slab's keys/values of the slot run [lo, hi) holding ``frames``, as ``dtype``; frames with a grad tap
        come back as value + tap (their gradient goes to the forward that left it)."""
        tpf, (lo, hi) = self.tpf, slots
        keys, values = self.keys[layer][:, lo * tpf:hi * tpf].to(dtype), self.values[layer][:, lo * tpf:hi * tpf].to(dtype)
        taps = self.grad_taps[layer]
        if not any(f in taps for f in frames):
            return keys, values
        pieces = []
        for i, f in enumerate(frames):
            k, v = keys[:, i * tpf:(i + 1) * tpf], values[:, i * tpf:(i + 1) * tpf]
            pieces.append((k + taps[f][0], v + taps[f][1]) if f in taps else (k, v))
        return torch.cat([k for k, _ in pieces], 1), torch.cat([v for _, v in pieces], 1)

    def write_slots(self, layer: int, frame_lo: int, k: torch.Tensor, v: torch.Tensor):
        """Copy k/v (whole frames from frame_lo on) into their slots, in place (slot runs split at the sinks)."""
        keys, values = self.slabs(layer, k)
        tpf, n = self.tpf, k.shape[1] // self.tpf
        i = 0
        while i < n:
            s = self.slot(frame_lo + i)
            j = i + 1
            while j < n and self.slot(frame_lo + j) == s + (j - i):
                j += 1
            keys[:, s * tpf:(s + j - i) * tpf] = k[:, i * tpf:j * tpf]
            values[:, s * tpf:(s + j - i) * tpf] = v[:, i * tpf:j * tpf]
            if layer == 0:
                for slot in range(s, s + j - i):
                    self.slot_version[slot] += 1
            i = j


def schedule_slots(window: int | None, sink: int, chunk_frames: int, frames_per_block: int) -> int | None:
    """Frame slots a cache needs when every forward is a chunk of at most ``chunk_frames`` frames whose first block has
    ``frames_per_block``: the sinks plus the widest span one forward reads and writes -- the window its first block
    still sees before the chunk, and the chunk (24 at window 21 for a fused [n-1, n] chunk of 3-frame blocks, 21
    unfused). None without a window (the slab grows with the video)."""
    if window is None:
        return None
    return sink + window - frames_per_block + max(chunk_frames, frames_per_block)


def frame_runs(positions: list[int]) -> list[tuple[int, int]]:
    """Sorted integers -> maximal [lo, hi) runs of consecutive ones."""
    runs = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1][1] = p + 1
        else:
            runs.append([p, p + 1])
    return [tuple(r) for r in runs]
