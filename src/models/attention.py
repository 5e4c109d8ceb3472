"""Self-attention of a chunk of latent frames: the kernel choice, block masks and the per-forward plan.

One visibility rule on latent frames covers every mode of ``src.models.wan.WanDiT``:

  a query frame whose block ends (exclusive) at frame e sees key frame k  iff  k < e  and
  (window is None or k >= e - window or k < sink).

``ChunkAttention`` turns the rule into kernel calls once per forward, from Python ints: unmasked calls per range of
visible keys (fa3 > fa2 > SDPA, ``attention_kernel``), a flex_attention ``BlockMask`` for multi-block passes on CUDA,
or a dense mask (the O(L^2) test reference). It reads and writes the ``KVCache`` (``src.models.kv_cache``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from src.models.kv_cache import CacheChanged, KVCache, frame_runs

try:  # optional GPU kernels (FlashAttention-3 on Hopper, FlashAttention-2); SDPA everywhere else
    from flash_attn_interface import flash_attn_func as fa3_func
except ImportError:  # pragma: no cover - depends on the machine
    fa3_func = None
try:
    from flash_attn import flash_attn_func as fa2_func
except ImportError:  # pragma: no cover - depends on the machine
    fa2_func = None


# --------------------------------------------------------------------------------------------- attention kernels

# SDPA's CUDA backends in priority order. Hopper: cuDNN first (the fastest for head_dim 128 there); elsewhere flash.
SDPA_HOPPER_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
SDPA_CUDA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


@functools.lru_cache(maxsize=16)
def _is_hopper(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] == 9


@functools.lru_cache(maxsize=1)
def _cudnn_attention_available() -> bool:
    """cuDNN's fused attention needs cuDNN 9 and SDPA's cuDNN backend enabled."""
    return torch.backends.cuda.cudnn_sdp_enabled() and (torch.backends.cudnn.version() or 0) >= 90000


def attention_kernel(q: torch.Tensor) -> str:
    """The one kernel choice point: what ``attention`` runs for inputs like q.

    CUDA, fp16/bf16, Hopper: 'fa3' (``flash_attn_interface``) > 'sdpa-cudnn' (SDPA with cuDNN first) > 'fa2'
    (``flash_attn``) > 'sdpa-cuda'; other CUDA GPUs: 'fa2' > 'sdpa-cuda' (SDPA: flash, cuDNN, memory-efficient, in
    that order); float32 on CUDA: 'sdpa-cuda'; 'sdpa' elsewhere. Which SDPA backend actually ran is read from the
    profiler by the GPU check (src/perf/check.py)."""
    if q.is_cuda:
        if q.dtype in (torch.float16, torch.bfloat16):
            hopper = _is_hopper(q.device)
            if hopper and fa3_func is not None:
                return "fa3"
            if hopper and _cudnn_attention_available():
                return "sdpa-cudnn"
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
    if kernel != "sdpa":
        with sdpa_kernel(SDPA_HOPPER_BACKENDS if kernel == "sdpa-cudnn" else SDPA_CUDA_BACKENDS, set_priority=True):
            return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
    return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)


# SDPA's fused CUDA kernels that also return the log-sum-exp (aten ops, [B, H, L, D] layout), by backend name.
def _cudnn_lse(q, k, v):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]


def _flash_lse(q, k, v):
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]


def _efficient_lse(q, k, v):
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]


CUDA_LSE_KERNELS = {"cudnn": _cudnn_lse, "flash": _flash_lse, "efficient": _efficient_lse}
_cuda_lse_choice: dict[tuple, str | None] = {}  # (kernel choice, dtype, head_dim) -> the first LSE kernel that ran


def cuda_lse_order(kernel: str, dtype: torch.dtype) -> list[str]:
    """The SDPA kernels tried for out + LSE on CUDA, fastest first (flash refuses float32)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return ["efficient"]
    return ["cudnn", "flash", "efficient"] if kernel == "sdpa-cudnn" else ["flash", "cudnn", "efficient"]


def attention_with_lse(q, k, v) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(out [B, Lq, H, D], log-sum-exp [B, H, Lq] float32) without grad, from the attention kernel itself: FA3/FA2,
    SDPA's cuDNN / flash / memory-efficient kernels on CUDA (the first that runs for these inputs, remembered), the
    CPU flash kernel; None where none returns it."""
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
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt)[:2]
        return out.transpose(1, 2), lse.float()
    if not q.is_cuda:
        return None
    key = (kernel, q.dtype, q.shape[-1])
    order = cuda_lse_order(kernel, q.dtype)
    if key in _cuda_lse_choice:
        order = [_cuda_lse_choice[key]] if _cuda_lse_choice[key] else []
    for name in order:
        try:
            out, lse = CUDA_LSE_KERNELS[name](qt, kt, vt)
        except (RuntimeError, NotImplementedError, TypeError):  # this kernel refuses these inputs: try the next
            continue
        _cuda_lse_choice[key] = name
        b, h, lq = qt.shape[:3]
        return out.transpose(1, 2), lse.float().reshape(b, h, -1)[..., :lq]  # efficient pads Lq to 32
    _cuda_lse_choice[key] = None
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


# How flex_attention runs per device type: a torch.compile backend, or None for eager flex (the unfused reference
# path: fine on CPU, and never used on CUDA, where it would materialise the score matrix). Compiled with static shapes
# and fullgraph: one graph per (query length, key length) -- ChunkAttention pads cached keys to the slab, so a chunk
# length has one shape -- and a hit of FLEX_RECOMPILE_LIMIT raises FlexRecompileLimit instead of running eagerly.
FLEX_COMPILE_BACKENDS: dict[str, object] = {"cuda": "inductor"}
FLEX_RECOMPILE_LIMIT = 16
_compiled_flex: dict[str, object] = {}


class FlexRecompileLimit(RuntimeError):
    """Compiled flex_attention met more distinct shapes than FLEX_RECOMPILE_LIMIT (never a silent eager fallback)."""


def _flex_limits() -> dict:
    """Dynamo settings for the compiled flex call (torch >= 2.7 names; 2.6 and older called the limit
    cache_size_limit and had no hard failure, where fullgraph=True makes the limit an error)."""
    config = torch._dynamo.config
    limits = {"recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit": FLEX_RECOMPILE_LIMIT}
    if hasattr(config, "fail_on_recompile_limit_hit"):
        limits["fail_on_recompile_limit_hit"] = True
    return limits


def flex(q, k, v, block_mask):
    """flex_attention on [B, L, H, D] tensors, compiled where FLEX_COMPILE_BACKENDS says."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    backend = FLEX_COMPILE_BACKENDS.get(q.device.type)
    if backend is None:
        return flex_attention(qt, kt, vt, block_mask=block_mask).transpose(1, 2)
    fn = _compiled_flex.get(q.device.type)
    if fn is None:
        fn = _compiled_flex[q.device.type] = torch.compile(flex_attention, backend=backend, dynamic=False,
                                                           fullgraph=True)
    try:
        with torch._dynamo.config.patch(**_flex_limits()):
            return fn(qt, kt, vt, block_mask=block_mask).transpose(1, 2)
    except torch._dynamo.exc.FailOnRecompileLimitHit as e:
        raise FlexRecompileLimit(
            f"compiled flex_attention hit its recompile limit ({FLEX_RECOMPILE_LIMIT} shapes) at q {tuple(qt.shape)}, "
            f"k {tuple(kt.shape)}: more distinct chunk lengths than expected") from e


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
    """The visibility rule (module docstring) for one query block (ending, exclusive, at block_end) and one key frame."""
    return key_frame < block_end and (window is None or key_frame >= block_end - window or key_frame < sink)


# --------------------------------------------------------------------------------------------- per-forward plan


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
                self.read_slots = frame_runs([cache.slot(f) for f in cached])
                self.read_frames = cached
                self.tapped: set[int] = set()  # layers whose grad taps this forward left (not again in a recompute)
                key_frames = cached + chunk
                if self.grad and cached:
                    cache.pinned = True
                    self.read_versions = self._versions()
        self.num_keys = len(key_frames) * tpf
        # flex passes over the cache see the whole slab (masked tiles past the keys cost nothing): one key length per
        # cache, so compiled flex has one graph per chunk length (FLEX_COMPILE_BACKENDS)
        self.flex_key_frames = cache.capacity if self.mode == "in_place" else len(key_frames)
        iso = set(range(chunk_pos, chunk_pos + isolated))
        self.visible = []  # per query frame: visibility over key positions (frames)
        self.groups: list[tuple[int, int, list[tuple[int, int]]]] = []  # (q_lo, q_hi, key runs), in frames
        for lo, hi in self.blocks:
            if lo < start + isolated:
                row = [p in iso for p in range(len(key_frames))]
            else:
                row = [p not in iso and f is not None and sees(hi, f, window, sink) for p, f in enumerate(key_frames)]
            self.visible += [row] * (hi - lo)
            runs = frame_runs([p for p, v in enumerate(row) if v])
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

    def keys_values(self, layer: int, k: torch.Tensor, v: torch.Tensor,
                    padded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The key/value tensors this forward attends over (writing the chunk's keys where the plan says); ``padded``:
        the whole slab in place (``flex_key_frames``)."""
        cache, tpf = self.cache, self.tpf
        if self.mode == "chunk":
            return k, v
        if self.mode == "in_place":
            cache.write_slots(layer, self.start, k, v)
            keys, values = cache.slabs(layer, k)
            n = self.flex_key_frames * tpf if padded else self.num_keys
            return keys[:, :n], values[:, :n]
        if self.grad and self.read_slots and self._versions() != self.read_versions:
            raise CacheChanged("the KV cache slots this forward read were overwritten before its checkpointed "
                               "recompute; run the backward before further cache writes (or disable checkpointing)")
        if self.grad and cache.cache_gradient == "official" and k.requires_grad and layer not in self.tapped:
            cache.tap(layer, self.start, k, v)
            self.tapped.add(layer)
        parts_k, parts_v = [], []
        if self.read_slots:
            cache.slabs(layer, k)
            done = 0
            for lo, hi in self.read_slots:
                keys, values = cache.read(layer, (lo, hi), self.read_frames[done:done + hi - lo], k.dtype)
                parts_k.append(keys)
                parts_v.append(values)
                done += hi - lo
        if self.write:
            cache.write_slots(layer, self.start, k[:, : self.write * tpf].detach(), v[:, : self.write * tpf].detach())
        if not parts_k:
            return k, v
        return torch.cat(parts_k + [k], 1), torch.cat(parts_v + [v], 1)

    def attend(self, layer: int, q, k, v) -> torch.Tensor:
        """q, k, v [B, n*tpf, H, D] of the chunk (RoPE applied) -> attention output [B, n*tpf, H, D]."""
        dtype = attention_dtype(q)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        use_flex = self.backend != "dense" and len(self.groups) > 1 and (self.backend == "flex" or q.is_cuda)
        keys, values = self.keys_values(layer, k, v, padded=use_flex)
        tpf = self.tpf
        if self.backend == "dense":
            mask = torch.tensor(self.visible, dtype=torch.bool, device=q.device)
            mask = mask.repeat_interleave(tpf, 0).repeat_interleave(tpf, 1)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                                 attn_mask=mask)
            return out.transpose(1, 2)
        if use_flex:
            if self._block_mask is None:  # one per geometry, shared by every layer and every later forward
                pad = (False,) * (self.flex_key_frames - len(self.visible[0]))
                self._block_mask = _cached_block_mask(tuple(tuple(r) + pad for r in self.visible), tpf, q.device)
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


@dataclass
class RowGroup:
    """Consecutive batch rows of a grouped forward (``WanDiT.forward_groups``) that attend through one cache: the
    chunk's true first frame, how many of its frames it writes, and how many leading frames are an isolated prefix
    (padding that no real query sees)."""

    rows: int
    cache: KVCache
    start_frame: int
    write: int = 0
    isolated: int = 0


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
