"""The Wan2.1 text-to-video DiT, numerically the published architecture, in one file.

Parameter names are the original Wan2.1 names (`blocks.0.self_attn.q.weight`, ...), so the released
`diffusion_pytorch_model.safetensors` loads with no renaming. Latents are laid out [B, F, C, H, W]
(frames first: the autoregressive unit is a block of frames).

Three attention modes, chosen per call (the visibility rule and the kernels: src/models/attention.py):

* bidirectional: ``model(x, t, ctx)`` -- the whole clip is one block.
* block-causal:  ``model(x, t, ctx, frames_per_block=3, window=None, sink=0)`` -- one pass, blocks of 3 frames.
* cached:        ``model(x, t, ctx, cache=cache, start_frame=f0, write_cache=True)`` -- the chunk attends to the
  cached keys/values of earlier frames plus itself (block-causal inside the chunk if ``frames_per_block`` is
  given), and optionally writes its own (``write_cache=n`` writes only the first n frames; src/models/kv_cache.py).

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

from src.models.attention import ChunkAttention, GroupedAttention, RowGroup, attention
from src.models.kv_cache import KVCache

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
    made under inference mode could not be saved for a later backward, a fake one (src.perf.estimate) has no values."""
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
    src.distributed.parallelize compiles); the self-attention between them goes through the forward's attention plan."""

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

    def new_cache(self, window: int | None = None, sink: int = 0, frames: int | None = None,
                  slots: int | None = None, cache_gradient: str = "detached") -> KVCache:
        return KVCache(self.cfg.num_layers, window=window, sink=sink, frames=frames, slots=slots,
                       cache_gradient=cache_gradient)

    def run_blocks(self, tokens, e0, text, rope, attn) -> torch.Tensor:
        """The transformer blocks (activation checkpointing, if any, wraps each block from outside:
        src.distributed.parallelize)."""
        for i, block in enumerate(self.blocks):
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
        b, n_frames = x.shape[:2]
        if isinstance(t, torch.Tensor):
            t = t.to(device=x.device, dtype=torch.float32)
        else:  # a Python number: filled on the device (no host-to-device copy)
            t = torch.full((b,), float(t), device=x.device)
        t = t.reshape(-1, 1).expand(b, n_frames) if t.dim() <= 1 else t
        if t.shape != (b, n_frames):
            raise ValueError(f"timesteps must be [B] or [B, F] = [{b}, {n_frames}], got {tuple(t.shape)}")
        tokens, e, e0, (h, w) = self.embed(x, t)

        # Attention geometry, from Python ints only: which frames are keys, and who may see whom.
        if cache is not None:
            if cache.text_source is not context:
                cache.reset_text()
                cache.text_source = context
            window, sink = cache.window, cache.sink
        num_write = n_frames if write_cache is True else int(write_cache)
        attn = ChunkAttention(cache, start_frame, n_frames, h * w, frames_per_block, window, sink,
                              num_write if cache is not None else 0, self.attention_backend)
        rope = rope_tables(self.cfg.head_dim, start_frame, n_frames, h, w, x.device)
        text = None if cache is not None and cache.text_kv[0] is not None and not torch.is_grad_enabled() \
            else self.embed_text(context)
        tokens = self.run_blocks(tokens, e0, text, rope, attn)
        attn.finish()
        return self.unpatchify(self.head(tokens, e), x)

    @torch.no_grad()
    def forward_groups(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, groups: list[RowGroup],
                       frames_per_block: int, text_kv: list) -> torch.Tensor:
        """One no-grad forward over groups of batch rows, each attending through its own cache at its own frames
        (``RowGroup``; the single-device wavefront's cells): projections, norms and FFN run on all rows at once.
        x [sum of rows, F, C, H, W], t [sum of rows, F]; ``text_kv``: per-layer text keys/values of this row layout
        (a list of None, filled on first use). Returns the velocity like ``forward``."""
        n_frames = x.shape[1]
        tokens, e, e0, (h, w) = self.embed(x, t.float())
        plans = [ChunkAttention(g.cache, g.start_frame, n_frames, h * w, frames_per_block, g.cache.window,
                                g.cache.sink, g.write, self.attention_backend, isolated=g.isolated) for g in groups]
        attn = GroupedAttention(plans, [g.rows for g in groups], text_kv)
        rope = torch.cat([rope_tables(self.cfg.head_dim, g.start_frame, n_frames, h, w, x.device)
                          .expand(g.rows, -1, -1, -1, -1) for g in groups])
        text = None if text_kv[0] is not None else self.embed_text(context)
        tokens = self.run_blocks(tokens, e0, text, rope, attn)
        attn.finish()
        return self.unpatchify(self.head(tokens, e), x)

    def embed(self, x: torch.Tensor, t: torch.Tensor):
        """Patch tokens [B, F*h*w, dim] (float32, (f, h, w) order), the time embedding e [B, F, dim] and its
        projection e0 [B, F, 6, dim] for per-frame timesteps t [B, F]; and the token grid (h, w) of a frame."""
        b, n_frames, _, height, width = x.shape
        pt, ph, pw = self.cfg.patch_size
        if pt != 1:
            raise ValueError("temporal patch size must be 1 for frame-wise attention")
        if height % ph or width % pw:
            raise ValueError(f"latent size {height}x{width} is not divisible by the patch size {ph}x{pw}")
        dtype = self.patch_embedding.weight.dtype
        tokens = self.patch_embedding(x.to(dtype).permute(0, 2, 1, 3, 4))  # [B, dim, F, h, w]
        tokens = tokens.flatten(2).transpose(1, 2).float()
        emb = sinusoidal_embedding(self.cfg.freq_dim, t).to(self.time_embedding[0].weight.dtype)
        e = self.time_embedding(emb).float()  # [B*F, dim]
        e0 = self.time_projection(e.to(dtype)).float().unflatten(1, (6, self.cfg.dim))
        return tokens, e.view(b, n_frames, -1), e0.view(b, n_frames, 6, -1), (height // ph, width // pw)

    def unpatchify(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Head output [B, F*h*w, ph*pw*C] -> latents shaped (and typed) like x [B, F, C, H, W]."""
        b, n_frames, _, height, width = x.shape
        _, ph, pw = self.cfg.patch_size
        c = self.cfg.out_dim
        out = out.view(b, n_frames, height // ph, width // pw, ph, pw, c).permute(0, 1, 6, 2, 4, 3, 5)
        return out.reshape(b, n_frames, c, height, width).to(x.dtype)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
