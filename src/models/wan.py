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

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

try:  # optional GPU kernel; SDPA is the default everywhere
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = None


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


def rope_cos_sin(head_dim: int, frames: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [L, head_dim/2] for tokens of the given absolute frames on an h x w grid, in (f, h, w) order."""
    df, dh, dw = rope_axis_dims(head_dim)
    device = frames.device
    af = rope_angles(frames, df)  # [F, df/2]
    ah = rope_angles(torch.arange(h, device=device), dh)
    aw = rope_angles(torch.arange(w, device=device), dw)
    n_f = frames.numel()
    angles = torch.cat(
        [
            af[:, None, None, :].expand(n_f, h, w, -1),
            ah[None, :, None, :].expand(n_f, h, w, -1),
            aw[None, None, :, :].expand(n_f, h, w, -1),
        ],
        dim=-1,
    ).reshape(n_f * h * w, head_dim // 2)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, D] with adjacent (re, im) pairs; rotation computed in float64 as Wan does."""
    xd = x.to(torch.float64).unflatten(-1, (-1, 2))
    re, im = xd[..., 0], xd[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2)
    return out.to(x.dtype)


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


def attention(q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
    """q [B, Lq, H, D], k/v [B, Lk, H, D], boolean mask [Lq, Lk] (True = may attend) or None."""
    if flash_attn_func is not None and mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash_attn_func(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


# --------------------------------------------------------------------------------------------- KV cache


class KVCache:
    """Self-attention keys/values of earlier latent frames, per layer, plus the text keys/values.

    Keys are stored after RoPE at their absolute frame positions. Frames are kept in ascending order. A write
    overwrites the slots of frames it already holds; with a rolling ``window`` of W frames (plus ``sink`` first
    frames that are never evicted) frames older than ``latest_end - W`` are evicted, so the cache never holds more
    than W + sink frames. Cross-attention keys/values are computed once per text context.
    """

    def __init__(self, num_layers: int, window: int | None = None, sink: int = 0):
        if window is not None and window <= 0:
            raise ValueError("window must be a positive number of frames or None")
        self.num_layers, self.window, self.sink = num_layers, window, sink
        self.reset()
        self.reset_text()

    def reset(self):
        """Forget every self-attention frame (the text keys/values stay)."""
        self.frames: list[int] = []
        self.keys: list[torch.Tensor | None] = [None] * self.num_layers
        self.values: list[torch.Tensor | None] = [None] * self.num_layers
        self._plan = None

    def reset_text(self):
        """Forget the text keys/values (call at a prompt switch)."""
        self.text_source = None
        self.text_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * self.num_layers

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    def context_frames(self, start: int) -> list[int]:
        """Cached frames a chunk starting at ``start`` may attend to: those strictly before it."""
        return [f for f in self.frames if f < start]

    # A forward plans its write once; every layer then applies the same plan to its own tensors.
    def plan_write(self, start: int, num_write: int, tokens_per_frame: int):
        written = list(range(start, start + num_write))
        kept_old = [(slot, f) for slot, f in enumerate(self.frames) if f not in written]
        new_frames = sorted([f for _, f in kept_old] + written)
        if self.window is not None:
            latest_end = max(new_frames) + 1
            new_frames = [f for f in new_frames if f >= latest_end - self.window or f < self.sink]
        sources = []  # per new frame: ("old", slot) or ("new", index in chunk)
        old_slot = {f: s for s, f in kept_old}
        for f in new_frames:
            sources.append(("new", f - start) if f in written else ("old", old_slot[f]))
        self._plan = (new_frames, sources, tokens_per_frame)

    def apply_write(self, layer: int, k_chunk: torch.Tensor, v_chunk: torch.Tensor):
        new_frames, sources, tpf = self._plan
        old_k, old_v = self.keys[layer], self.values[layer]

        def gather(old, new):
            parts = []
            for kind, i in sources:
                src = old if kind == "old" else new
                parts.append(src[:, i * tpf : (i + 1) * tpf])
            return torch.cat(parts, dim=1)

        self.keys[layer] = gather(old_k, k_chunk)
        self.values[layer] = gather(old_v, v_chunk)

    def commit_write(self):
        self.frames = self._plan[0]
        self._plan = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


def frame_visibility(
    query_frames: torch.Tensor,
    key_frames: torch.Tensor,
    chunk_start: int,
    chunk_len: int,
    frames_per_block: int | None,
    window: int | None,
    sink: int,
) -> torch.Tensor:
    """Boolean [Fq, Fk]: the module docstring's rule. Blocks are counted from the chunk's first frame."""
    fpb = frames_per_block or chunk_len
    rel = query_frames - chunk_start
    block_end = chunk_start + torch.clamp((rel // fpb + 1) * fpb, max=chunk_len)
    k = key_frames[None, :]
    e = block_end[:, None]
    visible = k < e
    if window is not None:
        visible &= (k >= e - window) | (k < sink)
    return visible


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
    def forward(self, x, rope, mask, cache: KVCache | None, layer: int, num_context_frames: int, tpf: int, write: bool):
        b, n, _ = x.shape
        q = self.norm_q(self.q(x)).view(b, n, self.num_heads, self.head_dim)
        k = self.norm_k(self.k(x)).view(b, n, self.num_heads, self.head_dim)
        v = self.v(x).view(b, n, self.num_heads, self.head_dim)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k_all, v_all = k, v
        if cache is not None and num_context_frames:
            ctx = num_context_frames * tpf  # cached frames before the chunk are a prefix (ascending order)
            k_all = torch.cat([cache.keys[layer][:, :ctx].to(k.dtype), k], dim=1)
            v_all = torch.cat([cache.values[layer][:, :ctx].to(v.dtype), v], dim=1)
        if cache is not None and write:
            cache.apply_write(layer, k.detach(), v.detach())
        out = attention(q, k_all, v_all, mask)
        return self.o(out.flatten(2))


class CrossAttention(Projections):
    def text_kv(self, context):
        b, n, _ = context.shape
        k = self.norm_k(self.k(context)).view(b, n, self.num_heads, self.head_dim)
        v = self.v(context).view(b, n, self.num_heads, self.head_dim)
        return k, v

    def forward(self, x, context, cache: KVCache | None, layer: int):
        b, n, _ = x.shape
        q = self.norm_q(self.q(x)).view(b, n, self.num_heads, self.head_dim)
        if cache is None or torch.is_grad_enabled():  # under autograd the text path must be in the graph
            k, v = self.text_kv(context)
        else:
            if cache.text_kv[layer] is None:
                cache.text_kv[layer] = tuple(t.detach() for t in self.text_kv(context))
            k, v = cache.text_kv[layer]
        return self.o(attention(q, k, v, None).flatten(2))


class WanAttentionBlock(nn.Module):
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

    def forward(self, x, e0, context, rope, mask, cache, layer, num_context_frames, tpf, write):
        """x [B, L, dim] float32 residual stream; e0 [B, F, 6, dim] float32 per-frame modulation."""
        b, n, d = x.shape
        n_frames = e0.shape[1]
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float()[:, None] + e0).unbind(2)

        def modulate(h, shift, scale):  # per-frame modulation of [B, F*T, dim] tokens
            h = h.view(b, n_frames, -1, d)
            return (h * (1 + scale[:, :, None]) + shift[:, :, None]).view(b, n, d)

        def gated(y, gate):
            return (y.float().view(b, n_frames, -1, d) * gate[:, :, None]).view(b, n, d)

        dtype = self.modulation.dtype
        y = self.self_attn(modulate(self.norm1(x), shift1, scale1).to(dtype), rope, mask, cache, layer,
                           num_context_frames, tpf, write)
        x = x + gated(y, gate1)
        x = x + self.cross_attn(self.norm3(x).to(dtype), context, cache, layer).float()
        y = self.ffn(modulate(self.norm2(x), shift2, scale2).to(dtype))
        return x + gated(y, gate2)


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
        self.gradient_checkpointing = False
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

    def new_cache(self, window: int | None = None, sink: int = 0) -> KVCache:
        return KVCache(self.cfg.num_layers, window=window, sink=sink)

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
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
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

        # Attention geometry: which frames are keys, and who may see whom.
        if cache is not None:
            if cache.text_source is not context:
                cache.reset_text()
                cache.text_source = context
            window, sink = cache.window, cache.sink
            context_frames = cache.context_frames(start_frame)
        else:
            context_frames = []
        query_frames = torch.arange(start_frame, start_frame + n_frames, device=x.device)
        key_frames = torch.cat([torch.tensor(context_frames, dtype=torch.long, device=x.device), query_frames])
        visible = frame_visibility(query_frames, key_frames, start_frame, n_frames, frames_per_block, window, sink)
        mask = None if bool(visible.all()) else visible.repeat_interleave(tpf, 0).repeat_interleave(tpf, 1)
        rope = rope_cos_sin(self.cfg.head_dim, query_frames, h, w)

        num_write = n_frames if write_cache is True else int(write_cache)
        write = cache is not None and num_write > 0
        if write:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                raise ValueError("cache writes run without grad (wrap them in torch.no_grad())")
            cache.plan_write(start_frame, num_write, tpf)

        text_cached = cache is not None and cache.text_kv[0] is not None and not torch.is_grad_enabled()
        text = None if text_cached else self.embed_text(context)
        for i, block in enumerate(self.blocks):
            args = (tokens, e0, text, rope, mask, cache, i, len(context_frames), tpf, write)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, *args, use_reentrant=False)
            else:
                tokens = block(*args)
        if write:
            cache.commit_write()

        out = self.head(tokens, e)  # [B, F*h*w, pt*ph*pw*C]
        c = self.cfg.out_dim
        out = out.view(b, n_frames, h, w, ph, pw, c).permute(0, 1, 6, 2, 4, 3, 5)
        return out.reshape(b, n_frames, c, height, width).to(x.dtype)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
