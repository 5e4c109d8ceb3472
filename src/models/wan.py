"""The Wan2.1 text-to-video DiT, numerically the published architecture, in one file.

Parameter names are the original Wan2.1 names (`blocks.0.self_attn.q.weight`, ...), so the released
`diffusion_pytorch_model.safetensors` loads with no renaming. Latents are laid out [B, F, C, H, W]
(frames first: the autoregressive unit is a block of frames).

Three attention modes, chosen per call, all expressed by one visibility rule on latent frames:

  a query frame whose block ends (exclusive) at frame e sees key frame k  iff  k < e  and
  (window is None or k >= e - window or k < sink).

* bidirectional: ``model(x, t, ctx)`` -- the whole clip is one block.
* block-causal:  ``model(x, t, ctx, frames_per_block=3, window=None, sink=0)`` -- one pass, blocks of 3 frames.
* cached:        ``model(x, t, ctx, cache=cache, start_frame=f0, write_cache=True)`` -- the chunk attends to the
  cached keys/values of earlier frames plus itself (block-causal inside the chunk if ``frames_per_block`` is
  given), and optionally writes its own (``write_cache=n`` writes only the first n frames).

The model knows nothing about training, sampling or parallelism.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import checkpoint

try:  # optional GPU kernels (FlashAttention-3 on Hopper, FlashAttention-2); SDPA everywhere else
    from flash_attn_interface import flash_attn_func as fa3_func
except ImportError:  # pragma: no cover - depends on the machine
    fa3_func = None
try:
    from flash_attn import flash_attn_func as fa2_func
except ImportError:  # pragma: no cover - depends on the machine
    fa2_func = None


# --------------------------------------------------------------------------------------------- config


@dataclass
class WanConfig:
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    text_len: int = 512
    text_dim: int = 4096
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if (self.dim // self.num_heads) % 2:
            raise ValueError("head_dim must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_dict(cls, d: dict) -> WanConfig:
        """Accepts our own keys, a Wan release `config.json`, or a diffusers transformer config."""
        d = dict(d)
        if "num_attention_heads" in d:  # diffusers WanTransformer3DModel config
            d = {
                "dim": d["num_attention_heads"] * d["attention_head_dim"],
                "ffn_dim": d["ffn_dim"],
                "freq_dim": d.get("freq_dim", 256),
                "num_heads": d["num_attention_heads"],
                "num_layers": d["num_layers"],
                "in_dim": d["in_channels"],
                "out_dim": d["out_channels"],
                "text_len": 512,
                "text_dim": d.get("text_dim", 4096),
                "patch_size": d["patch_size"],
                "eps": d.get("eps", 1e-6),
            }
        if d.get("model_type", "t2v") != "t2v":
            raise ValueError(f"only text-to-video Wan models are supported, got model_type={d['model_type']!r}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> WanConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d


# --------------------------------------------------------------------------------------------- pieces


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """Wan's timestep embedding in float64: [cos | sin] of t * 10000^(-i/half)."""
    half = dim // 2
    t = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t.reshape(-1), freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Real dims per axis (frame, height, width); 44/42/42 for head_dim 128."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_angles(positions: torch.Tensor, axis_dim: int) -> torch.Tensor:
    """Angles [N, axis_dim/2] for integer positions, float64, any position (no 1024 table)."""
    freqs = 1.0 / torch.pow(10000.0, torch.arange(0, axis_dim, 2, dtype=torch.float64, device=positions.device) / axis_dim)
    return torch.outer(positions.to(torch.float64), freqs)


def rope_tables(head_dim: int, start: int, n_frames: int, h: int, w: int, device) -> torch.Tensor:
    """(cos, sin) pairs [1, L, 1, head_dim/2, 2] (float32) for the tokens of frames start .. start + F - 1 on an h x w
    grid, in (f, h, w) order. Angles in float64; cached per geometry, so every layer and every later forward at the
    same frames reuse one table (no host work, no float64 in the forward). The cache holds only ordinary tensors: one
    made under inference mode could not be saved for a later backward, a fake one (src.estimate) has no values."""
    with torch.inference_mode(False):
        table = _rope_table(head_dim, start, n_frames, h, w, torch.device(device))
    if isinstance(table, FakeTensor):
        _rope_table.cache_clear()
    return table


@functools.lru_cache(maxsize=64)
def _rope_table(head_dim: int, start: int, n_frames: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    df, dh, dw = rope_axis_dims(head_dim)
    grid = (n_frames, h, w)
    frame = rope_angles(torch.arange(start, start + n_frames, device=device), df)[:, None, None]
    height = rope_angles(torch.arange(h, device=device), dh)[None, :, None]
    width = rope_angles(torch.arange(w, device=device), dw)[None, None, :]
    angles = torch.cat([a.expand(*grid, -1) for a in (frame, height, width)], dim=-1)
    table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1).float()
    return table.reshape(1, n_frames * h * w, 1, head_dim // 2, 2)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, D] with adjacent (re, im) pairs, rope [B or 1, L, 1, D/2, 2] (cos, sin); rotated in float32."""
    xf = x.float().unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():  # inductor generates no complex kernels: the same products in real arithmetic
        (re, im), (cos, sin) = xf.unbind(-1), rope.unbind(-1)
        out = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1)
    else:  # eager: one complex multiply instead of six real kernels and a stack
        out = torch.view_as_real(torch.view_as_complex(xf) * torch.view_as_complex(rope))
    return out.flatten(-2).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the full width (Wan's q/k norm spans all heads), computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the parameter dtype (bf16 weights are upcast, as under autocast)."""

    def forward(self, x):
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


# --------------------------------------------------------------------------------------------- attention kernels

# On CUDA, SDPA tries these in order (cuDNN is the fastest for head_dim 128 on Hopper; flash refuses float32).
SDPA_CUDA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


@functools.lru_cache(maxsize=16)
def _is_hopper(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] == 9


def attention_kernel(q: torch.Tensor) -> str:
    """The one kernel choice point: what ``attention`` runs for inputs like q.

    'fa3' (``flash_attn_interface``, Hopper, fp16/bf16) > 'fa2' (``flash_attn``, fp16/bf16) > 'sdpa-cuda' (SDPA
    restricted to cuDNN / flash / memory-efficient, in that order) on CUDA; 'sdpa' elsewhere."""
    if q.is_cuda:
        if q.dtype in (torch.float16, torch.bfloat16):
            if fa3_func is not None and _is_hopper(q.device):
                return "fa3"
            if fa2_func is not None:
                return "fa2"
        return "sdpa-cuda"
    return "sdpa"


def attention_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype self-attention computes and caches in: autocast's when it is on (its SDPA would cast to it anyway,
    and the official KV cache is bf16), else the tensors' own."""
    kind = q.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else q.dtype


def attention(q, k, v) -> torch.Tensor:
    """Unmasked attention, q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D]."""
    kernel = attention_kernel(q)
    if kernel == "fa3":
        out = fa3_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out
    if kernel == "fa2":
        return fa2_func(q, k, v)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if kernel == "sdpa-cuda":
        with sdpa_kernel(SDPA_CUDA_BACKENDS, set_priority=True):
            return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
    return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)


def attention_with_lse(q, k, v) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(out [B, Lq, H, D], log-sum-exp [B, H, Lq] float32) without grad, or None where no kernel returns it."""
    kernel = attention_kernel(q)
    if kernel == "fa3":
        try:
            out, lse = fa3_func(q, k, v, return_attn_probs=True)[:2]
        except TypeError:  # older interface: always (out, lse)
            out, lse = fa3_func(q, k, v)[:2]
        return out, lse.float()
    if kernel == "fa2":
        out, lse, _ = fa2_func(q, k, v, return_attn_probs=True)
        return out, lse.float()
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))[:2]
        return out.transpose(1, 2), lse.float()
    return None


def attend_pieces(q, pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Attention of q to the union of several key/value pieces, no mask: one call for one piece; without grad the
    pieces' results merged by their log-sum-exp; with grad (or without an LSE kernel) one call on their concatenation."""
    if len(pieces) == 1:
        return attention(q, *pieces[0])
    if not torch.is_grad_enabled():
        parts = [attention_with_lse(q, k, v) for k, v in pieces]
        if all(p is not None for p in parts):
            lse = torch.stack([p[1] for p in parts])  # [P, B, H, Lq]
            weights = torch.softmax(lse, dim=0).transpose(2, 3)[..., None]  # [P, B, Lq, H, 1]
            return sum(w * p[0].float() for w, p in zip(weights, parts)).to(q.dtype)
    return attention(q, torch.cat([k for k, _ in pieces], 1), torch.cat([v for _, v in pieces], 1))


_compiled_flex = None


def flex(q, k, v, block_mask):
    """flex_attention on [B, L, H, D] tensors; compiled on CUDA (eager flex is an unfused reference path)."""
    global _compiled_flex
    fn = flex_attention
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    return fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask).transpose(1, 2)


FLEX_BLOCK = 128


def frame_block_mask(visible: list[list[bool]], tpf: int, device) -> BlockMask:
    """A flex_attention BlockMask from frame-level visibility [Fq][Fk] (tokens: tpf per frame, frame-major).

    Tiles (FLEX_BLOCK x FLEX_BLOCK tokens) are classified full / partial / empty from 2-D prefix sums of the frame
    matrix, so nothing of size [Lq, Lk] is ever built; partial tiles (frame boundaries inside a tile) use the mask_mod.
    """
    vis = torch.tensor(visible, dtype=torch.bool, device=device)
    fq, fk = vis.shape
    lq, lk = fq * tpf, fk * tpf
    prefix = F.pad(vis.int().cumsum(0).cumsum(1), (1, 0, 1, 0))
    qb = torch.arange(-(-lq // FLEX_BLOCK), device=device)
    kb = torch.arange(-(-lk // FLEX_BLOCK), device=device)
    q_lo, q_hi = qb * FLEX_BLOCK // tpf, (torch.clamp((qb + 1) * FLEX_BLOCK, max=lq) - 1) // tpf + 1
    k_lo, k_hi = kb * FLEX_BLOCK // tpf, (torch.clamp((kb + 1) * FLEX_BLOCK, max=lk) - 1) // tpf + 1
    count = (prefix[q_hi[:, None], k_hi[None]] - prefix[q_lo[:, None], k_hi[None]]
             - prefix[q_hi[:, None], k_lo[None]] + prefix[q_lo[:, None], k_lo[None]])
    area = (q_hi - q_lo)[:, None] * (k_hi - k_lo)[None]
    full, partial = count == area, (count > 0) & (count < area)

    def blocks(selected):  # selected tiles first, in ascending order
        order = torch.argsort((~selected).int(), dim=-1, stable=True)
        return selected.sum(-1).int()[None, None], order.int()[None, None]

    def mask_mod(b, h, q_idx, kv_idx):
        return vis[q_idx // tpf, kv_idx // tpf]

    return BlockMask.from_kv_blocks(*blocks(partial), *blocks(full), BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(lq, lk))


@functools.lru_cache(maxsize=64)
def _cached_block_mask(visible: tuple[tuple[bool, ...], ...], tpf: int, device: torch.device) -> BlockMask:
    return frame_block_mask([list(r) for r in visible], tpf, device)


# --------------------------------------------------------------------------------------------- visibility


def sees(block_end: int, key_frame: int, window: int | None, sink: int) -> bool:
    """The module docstring's rule for one query block (ending, exclusive, at block_end) and one key frame."""
    return key_frame < block_end and (window is None or key_frame >= block_end - window or key_frame < sink)


def frame_visibility(query_frames, key_frames, chunk_start: int, chunk_len: int, frames_per_block: int | None,
                     window: int | None, sink: int) -> list[list[bool]]:
    """Frame-level visibility [Fq][Fk] (Python ints in, lists out). Blocks are counted from the chunk's first frame."""
    fpb = frames_per_block or chunk_len
    ends = [chunk_start + min(((q - chunk_start) // fpb + 1) * fpb, chunk_len) for q in query_frames]
    return [[sees(e, k, window, sink) for k in key_frames] for e in ends]


# --------------------------------------------------------------------------------------------- KV cache


class CacheChanged(RuntimeError):
    """A checkpointed forward's recompute would read cache slots that were overwritten since its forward."""


class KVCache:
    """Self-attention keys/values of earlier latent frames, per layer, plus the text keys/values.

    Storage: one preallocated slab per layer, [B, slots * tokens_per_frame, heads, head_dim], written in place. Sink
    frames 0 .. sink-1 live in slots 0 .. sink-1; every other frame f in slot f - base (the rolling offset). The cached
    frames are the sink frames written so far plus one contiguous run [run_start, run_end). When a chunk does not fit
    after the run, the frames it may still see are moved to just after the sinks (a copy of at most ``window`` frames,
    amortised over ``window`` written frames); the slab grows only while no window bounds it. Keys are stored after RoPE
    at their absolute frame positions, so a block's visible frames are one contiguous slot range (two with sinks).

    A write overwrites frames it already holds; with a rolling ``window`` of W frames (plus ``sink`` first frames
    that are never evicted) frames older than ``latest_end - W`` are evicted. Cross-attention keys/values are computed
    once per text context. ``slot_version`` counts writes per slot: a forward that reads the cache with grad records
    the versions it read, and its checkpointed recompute raises ``CacheChanged`` instead of using other values.
    """

    def __init__(self, num_layers: int, window: int | None = None, sink: int = 0, frames: int | None = None):
        if window is not None and window <= 0:
            raise ValueError("window must be a positive number of frames or None")
        if sink < 0:
            raise ValueError("sink must be >= 0")
        self.num_layers, self.window, self.sink = num_layers, window, sink
        self.max_frames = frames  # the video's length when known: the slabs never need more slots
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
        runs = _runs([self.slot(f) for f in self.frames])
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


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """Sorted integers -> maximal [lo, hi) runs of consecutive ones."""
    runs = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1][1] = p + 1
        else:
            runs.append([p, p + 1])
    return [tuple(r) for r in runs]


class ChunkAttention:
    """How one forward's self-attention reads and writes keys, decided once per forward from Python ints.

    Query blocks of ``frames_per_block`` frames (counted from the chunk's first frame) each see one or two contiguous
    ranges of the key tensor, by the visibility rule: the key tensor is the cache slab itself when the chunk's keys can
    be written in place before attending (no grad), else the visible cached frames concatenated with the chunk (grad:
    the values saved for backward must not be overwritten later), or the chunk alone without a cache. Query blocks with
    the same key ranges share one call. ``backend``: "auto" (unmasked calls per range; flex_attention with a BlockMask
    for multi-block passes on CUDA), "flex" (the BlockMask wherever a pass has more than one block), "dense" (an
    [Lq, Lk] boolean mask: the O(L^2) reference for tests). ``isolated``: the first frames of the chunk form a block
    that sees only itself and that no other block sees (the wavefront's dummy prefix).
    """

    def __init__(self, cache: KVCache | None, start: int, n_frames: int, tpf: int, frames_per_block: int | None,
                 window: int | None, sink: int, num_write: int = 0, backend: str = "auto", isolated: int = 0):
        if backend not in ("auto", "flex", "dense"):
            raise ValueError(f"attention backend must be auto, flex or dense, got {backend!r}")
        fpb = frames_per_block or n_frames
        self.cache, self.start, self.n, self.tpf, self.backend = cache, start, n_frames, tpf, backend
        self.write = num_write if cache is not None else 0
        self.grad = torch.is_grad_enabled()
        self.blocks = [(start + i, min(start + i + fpb, start + n_frames)) for i in range(0, n_frames, fpb)]
        if isolated and (isolated % fpb or isolated >= n_frames):
            raise ValueError("the isolated prefix must be whole blocks of the chunk")
        first_end = self.blocks[0][1] if not isolated else self.blocks[isolated // fpb][1]
        first_visible = first_end - window if window is not None else None
        chunk = list(range(start, start + n_frames))
        if cache is None:
            self.mode, key_frames, chunk_pos = "chunk", chunk, 0
        else:
            if cache.tpf != tpf:
                if cache.num_frames:
                    raise ValueError(f"KV cache holds {cache.tpf} tokens per frame, got {tpf}")
                cache.tpf, cache.keys, cache.values = tpf, [None] * cache.num_layers, [None] * cache.num_layers
            in_place = cache.place(start, start + n_frames, first_visible, start, start + self.write)
            in_place = in_place and not self.grad
            cached = cache.cached_before(start, first_visible)
            if in_place:
                self.mode, chunk_pos = "in_place", cache.slot(start)
                key_frames = [None] * (chunk_pos + n_frames)
                for f in cached:
                    key_frames[cache.slot(f)] = f
                key_frames[chunk_pos:] = chunk
            else:
                self.mode, chunk_pos = "copy", len(cached)
                self.read_slots = _runs([cache.slot(f) for f in cached])
                key_frames = cached + chunk
                if self.grad and cached:
                    cache.pinned = True
                    self.read_versions = self._versions()
        self.num_keys = len(key_frames) * tpf
        iso = set(range(chunk_pos, chunk_pos + isolated))
        self.visible = []  # per query frame: visibility over key positions (frames)
        self.groups: list[tuple[int, int, list[tuple[int, int]]]] = []  # (q_lo, q_hi, key runs), in frames
        for lo, hi in self.blocks:
            if lo < start + isolated:
                row = [p in iso for p in range(len(key_frames))]
            else:
                row = [p not in iso and f is not None and sees(hi, f, window, sink) for p, f in enumerate(key_frames)]
            self.visible += [row] * (hi - lo)
            runs = _runs([p for p, v in enumerate(row) if v])
            if self.groups and self.groups[-1][2] == runs and self.groups[-1][1] == lo - start:
                self.groups[-1] = (self.groups[-1][0], hi - start, runs)
            else:
                self.groups.append((lo - start, hi - start, runs))
        self._block_mask = None

    def _versions(self) -> tuple[int, ...]:
        return tuple(self.cache.slot_version[s] for lo, hi in self.read_slots for s in range(lo, hi))

    def text_kv(self, layer: int, cross_attn, text):
        """Cross-attention keys/values: cached per text context when no grad is needed."""
        cache = self.cache
        if cache is None or self.grad:  # under autograd the text path must be in the graph
            return cross_attn.text_kv(text)
        if cache.text_kv[layer] is None:
            cache.text_kv[layer] = tuple(t.detach() for t in cross_attn.text_kv(text))
        return cache.text_kv[layer]

    def keys_values(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The key/value tensors this forward attends over (writing the chunk's keys where the plan says)."""
        cache, tpf = self.cache, self.tpf
        if self.mode == "chunk":
            return k, v
        if self.mode == "in_place":
            cache.write_slots(layer, self.start, k, v)
            keys, values = cache.slabs(layer, k)
            return keys[:, : self.num_keys], values[:, : self.num_keys]
        if self.grad and self.read_slots and self._versions() != self.read_versions:
            raise CacheChanged("the KV cache slots this forward read were overwritten before its checkpointed "
                               "recompute; run the backward before further cache writes (or disable checkpointing)")
        parts_k, parts_v = [], []
        if self.read_slots:
            keys, values = cache.slabs(layer, k)
            for lo, hi in self.read_slots:
                parts_k.append(keys[:, lo * tpf:hi * tpf].to(k.dtype))
                parts_v.append(values[:, lo * tpf:hi * tpf].to(v.dtype))
        if self.write:
            cache.write_slots(layer, self.start, k[:, : self.write * tpf].detach(), v[:, : self.write * tpf].detach())
        if not parts_k:
            return k, v
        return torch.cat(parts_k + [k], 1), torch.cat(parts_v + [v], 1)

    def attend(self, layer: int, q, k, v) -> torch.Tensor:
        """q, k, v [B, n*tpf, H, D] of the chunk (RoPE applied) -> attention output [B, n*tpf, H, D]."""
        dtype = attention_dtype(q)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        keys, values = self.keys_values(layer, k, v)
        tpf = self.tpf
        if self.backend == "dense":
            mask = torch.tensor(self.visible, dtype=torch.bool, device=q.device)
            mask = mask.repeat_interleave(tpf, 0).repeat_interleave(tpf, 1)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                                 attn_mask=mask)
            return out.transpose(1, 2)
        if len(self.groups) > 1 and (self.backend == "flex" or q.is_cuda):
            if self._block_mask is None:  # one per geometry, shared by every layer and every later forward
                self._block_mask = _cached_block_mask(tuple(map(tuple, self.visible)), tpf, q.device)
            return flex(q, keys, values, self._block_mask)
        outs = []
        for q_lo, q_hi, runs in self.groups:
            pieces = [(keys[:, lo * tpf:hi * tpf], values[:, lo * tpf:hi * tpf]) for lo, hi in runs]
            outs.append(attend_pieces(q[:, q_lo * tpf:q_hi * tpf], pieces))
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)

    def finish(self):
        """After the forward: the written frames become part of the cache."""
        if self.write:
            self.cache.commit(self.start, self.start + self.write)

    @property
    def key_tokens(self) -> int:
        """Keys per query row given to the kernels (for FLOP accounting): the widest group's visible keys."""
        return max(sum(hi - lo for lo, hi in runs) for _, _, runs in self.groups) * self.tpf


class GroupedAttention:
    """Several ChunkAttention plans over consecutive batch rows (the wavefront's cells): each group of rows attends
    through its own cache and frames; they share one forward's projections and FFN."""

    def __init__(self, plans: list[ChunkAttention], rows: list[int], text_kv: list):
        self.plans, self.text_kv_store = plans, text_kv
        self.slices, row = [], 0
        for r in rows:
            self.slices.append(slice(row, row + r))
            row += r

    def text_kv(self, layer: int, cross_attn, text):
        if self.text_kv_store[layer] is None:
            self.text_kv_store[layer] = tuple(t.detach() for t in cross_attn.text_kv(text))
        return self.text_kv_store[layer]

    def attend(self, layer: int, q, k, v) -> torch.Tensor:
        return torch.cat([p.attend(layer, q[s], k[s], v[s]) for p, s in zip(self.plans, self.slices)], 0)

    def finish(self):
        for p in self.plans:
            p.finish()


# --------------------------------------------------------------------------------------------- layers


class Projections(nn.Module):
    """q, k, v, o projections with Wan's q/k RMSNorm over the full width (shared by self- and cross-attention)."""

    def __init__(self, dim, num_heads, eps, qk_norm=True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()


class SelfAttention(Projections):
    def qkv(self, x, rope):
        b, n, _ = x.shape
        q = self.norm_q(self.q(x)).view(b, n, self.num_heads, self.head_dim)
        k = self.norm_k(self.k(x)).view(b, n, self.num_heads, self.head_dim)
        v = self.v(x).view(b, n, self.num_heads, self.head_dim)
        return apply_rope(q, rope), apply_rope(k, rope), v


class CrossAttention(Projections):
    def text_kv(self, context):
        b, n, _ = context.shape
        k = self.norm_k(self.k(context)).view(b, n, self.num_heads, self.head_dim)
        v = self.v(context).view(b, n, self.num_heads, self.head_dim)
        return k, v

    def forward(self, x, k, v):
        b, n, _ = x.shape
        q = self.norm_q(self.q(x)).view(b, n, self.num_heads, self.head_dim)
        return self.o(attention(q, k, v).flatten(2))


class WanAttentionBlock(nn.Module):
    """One DiT block. Its elementwise work sits in ``pre_attention`` / ``post_attention`` (pure tensor functions that
    src.models.compile compiles); the self-attention between them goes through the forward's attention plan."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.eps, cfg.qk_norm)
        self.norm3 = LayerNorm(dim, eps=cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.eps, cfg.qk_norm)
        self.norm2 = LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    @staticmethod
    def _modulate(h, shift, scale):  # per-frame modulation of [B, F*T, dim] tokens, shift/scale [B, F, dim]
        b, n, d = h.shape
        f = shift.shape[1]
        return (h.view(b, f, -1, d) * (1 + scale[:, :, None]) + shift[:, :, None]).view(b, n, d)

    @staticmethod
    def _gated(y, gate):
        b, n, d = y.shape
        return (y.float().view(b, gate.shape[1], -1, d) * gate[:, :, None]).view(b, n, d)

    def pre_attention(self, x, e0, rope):
        """x [B, L, dim] float32 residual stream, e0 [B, F, 6, dim] float32 -> q, k, v of the self-attention."""
        shift1, scale1 = (self.modulation[:, :2].float()[:, None] + e0[:, :, :2]).unbind(2)
        h = self._modulate(self.norm1(x), shift1, scale1).to(self.modulation.dtype)
        return self.self_attn.qkv(h, rope)

    def post_attention(self, x, y, e0, text_k, text_v):
        """The rest of the block after the self-attention output y [B, L, H, D]."""
        gate1, shift2, scale2, gate2 = (self.modulation[:, 2:].float()[:, None] + e0[:, :, 2:]).unbind(2)
        dtype = self.modulation.dtype
        x = x + self._gated(self.self_attn.o(y.flatten(2)), gate1)
        x = x + self.cross_attn(self.norm3(x).to(dtype), text_k, text_v).float()
        y = self.ffn(self._modulate(self.norm2(x), shift2, scale2).to(dtype))
        return x + self._gated(y, gate2)

    def forward(self, x, e0, text, rope, attn, layer: int):
        q, k, v = self.pre_attention(x, e0, rope)
        y = attn.attend(layer, q, k, v)
        text_k, text_v = attn.text_kv(layer, self.cross_attn, text)
        return self.post_attention(x, y, e0, text_k, text_v)


class Head(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e):
        """e [B, F, dim]: the unprojected time embedding."""
        b, n, d = x.shape
        shift, scale = (self.modulation.float()[:, None] + e[:, :, None]).unbind(2)
        h = self.norm(x).view(b, e.shape[1], -1, d)
        h = (h * (1 + scale[:, :, None]) + shift[:, :, None]).view(b, n, d)
        return self.head(h.to(self.head.weight.dtype))


# --------------------------------------------------------------------------------------------- the model


class WanDiT(nn.Module):
    """Wan2.1 T2V DiT. forward(x [B,F,C,H,W], t [B,F] or [B], context [B,L,text_dim]) -> velocity v = noise - x0."""

    def __init__(self, cfg: WanConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or WanConfig(**overrides)
        self.cfg = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList(WanAttentionBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.gradient_checkpointing = False  # set from outside (training configs)
        self.attention_backend = "auto"  # "auto" | "flex" | "dense" (the O(L^2) test reference): ChunkAttention
        self.init_weights()

    def init_weights(self):
        """Wan's initialisation, except a small non-zero output head (a zero head makes random models trivial)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in list(self.text_embedding) + list(self.time_embedding):
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.head.head.weight, std=0.02)

    def new_cache(self, window: int | None = None, sink: int = 0, frames: int | None = None) -> KVCache:
        return KVCache(self.cfg.num_layers, window=window, sink=sink, frames=frames)

    def run_blocks(self, tokens, e0, text, rope, attn) -> torch.Tensor:
        """The transformer blocks (checkpointed per block when gradient_checkpointing is on and grad is enabled)."""
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, e0, text, rope, attn, i, use_reentrant=False)
            else:
                tokens = block(tokens, e0, text, rope, attn, i)
        return tokens

    def tokens_per_frame(self, height: int, width: int) -> int:
        _, ph, pw = self.cfg.patch_size
        return (height // ph) * (width // pw)

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """Zero-pads the text to text_len (Wan attends to padding without a mask) and applies the MLP."""
        if context.shape[1] < self.cfg.text_len:
            context = F.pad(context, (0, 0, 0, self.cfg.text_len - context.shape[1]))
        return self.text_embedding(context.to(self.text_embedding[0].weight.dtype))

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        *,
        frames_per_block: int | None = None,
        window: int | None = None,
        sink: int = 0,
        cache: KVCache | None = None,
        start_frame: int = 0,
        write_cache: bool | int = False,
    ) -> torch.Tensor:
        b, n_frames, _, height, width = x.shape
        pt, ph, pw = self.cfg.patch_size
        if pt != 1:
            raise ValueError("temporal patch size must be 1 for frame-wise attention")
        if height % ph or width % pw:
            raise ValueError(f"latent size {height}x{width} is not divisible by the patch size {ph}x{pw}")
        h, w = height // ph, width // pw
        tpf = h * w
        if isinstance(t, torch.Tensor):
            t = t.to(device=x.device, dtype=torch.float32)
        else:  # a Python number: filled on the device (no host-to-device copy)
            t = torch.full((b,), float(t), device=x.device)
        t = t.reshape(-1, 1).expand(b, n_frames) if t.dim() <= 1 else t
        if t.shape != (b, n_frames):
            raise ValueError(f"timesteps must be [B] or [B, F] = [{b}, {n_frames}], got {tuple(t.shape)}")

        dtype = self.patch_embedding.weight.dtype
        tokens = self.patch_embedding(x.to(dtype).permute(0, 2, 1, 3, 4))  # [B, dim, F, h, w]
        tokens = tokens.flatten(2).transpose(1, 2).float()  # [B, F*h*w, dim], (f, h, w) order

        emb = sinusoidal_embedding(self.cfg.freq_dim, t).to(self.time_embedding[0].weight.dtype)
        e = self.time_embedding(emb).float()  # [B*F, dim]
        e0 = self.time_projection(e.to(dtype)).float().unflatten(1, (6, self.cfg.dim))
        e, e0 = e.view(b, n_frames, -1), e0.view(b, n_frames, 6, -1)

        # Attention geometry, from Python ints only: which frames are keys, and who may see whom.
        if cache is not None:
            if cache.text_source is not context:
                cache.reset_text()
                cache.text_source = context
            window, sink = cache.window, cache.sink
        num_write = n_frames if write_cache is True else int(write_cache)
        if cache is not None and num_write and self.gradient_checkpointing and torch.is_grad_enabled():
            raise ValueError("cache writes run without grad (wrap them in torch.no_grad())")
        attn = ChunkAttention(cache, start_frame, n_frames, tpf, frames_per_block, window, sink,
                              num_write if cache is not None else 0, self.attention_backend)
        rope = rope_tables(self.cfg.head_dim, start_frame, n_frames, h, w, x.device)
        text = None if cache is not None and cache.text_kv[0] is not None and not torch.is_grad_enabled() \
            else self.embed_text(context)
        tokens = self.run_blocks(tokens, e0, text, rope, attn)
        attn.finish()

        out = self.head(tokens, e)  # [B, F*h*w, pt*ph*pw*C]
        c = self.cfg.out_dim
        out = out.view(b, n_frames, h, w, ph, pw, c).permute(0, 1, 6, 2, 4, 3, 5)
        return out.reshape(b, n_frames, c, height, width).to(x.dtype)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
