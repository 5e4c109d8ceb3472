"""Original Wan2.1 checkpoint names -> transformers `UMT5EncoderModel` / diffusers `AutoencoderKLWan` names.

umT5 (`models_t5_umt5-xxl-enc-bf16.pth`, Wan's `T5Encoder`; per block a self-attention and a gated-GELU FFN):

    token_embedding                     -> shared (+ encoder.embed_tokens, tied)
    blocks.i.norm1                      -> encoder.block.i.layer.0.layer_norm
    blocks.i.attn.{q,k,v,o}             -> encoder.block.i.layer.0.SelfAttention.{q,k,v,o}
    blocks.i.pos_embedding.embedding    -> encoder.block.i.layer.0.SelfAttention.relative_attention_bias
    blocks.i.norm2                      -> encoder.block.i.layer.1.layer_norm
    blocks.i.ffn.gate.0 / fc1 / fc2     -> encoder.block.i.layer.1.DenseReluDense.wi_0 / wi_1 / wo
    norm                                -> encoder.final_layer_norm

(Wan's FFN is fc2(fc1(x) * gelu(gate(x))), transformers' is wo(wi_1(x) * gelu(wi_0(x))).)

VAE (`Wan2.1_VAE.pth`; facts from diffusers `scripts/convert_wan_to_diffusers.py`):

    conv1 / conv2                       -> quant_conv / post_quant_conv
    {encoder,decoder}.conv1             -> {encoder,decoder}.conv_in
    {encoder,decoder}.head.0 / head.2   -> {encoder,decoder}.norm_out / conv_out
    {encoder,decoder}.middle.0 / 1 / 2  -> {encoder,decoder}.mid_block.resnets.0 / attentions.0 / resnets.1
    encoder.downsamples.k               -> encoder.down_blocks.k (same flat list)
    decoder.upsamples.k                 -> decoder.up_blocks.l.resnets.j, or .upsamplers.0 for the level's last entry
                                           (each level: num_res_blocks + 1 residual blocks, then one upsampler)
    inside residual blocks: residual.0 / 2 / 3 / 6 -> norm1 / conv1 / norm2 / conv2, shortcut -> conv_shortcut
    (resample.1, time_conv, attention norm / to_qkv / proj keep their names)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def load_original(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain state dict saved with torch.save (memory-mapped, CPU, weights_only)."""
    state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a plain state dict (name -> tensor) as in the Wan2.1 release")
    return state


def _rename_all(state: dict, rename: Callable[[str], str | None], source: str) -> dict:
    out, unknown = {}, []
    for key, value in state.items():
        new = rename(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" ... ({len(unknown)} in all)" if len(unknown) > 10 else "")
        raise ValueError(f"{source}: keys that are not original Wan2.1 names: {shown}")
    return out


# --------------------------------------------------------------------------------------------- umT5

_T5_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_T5_TOP = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


def _t5_name(key: str) -> str | None:
    if key in _T5_TOP:
        return _T5_TOP[key]
    m = _BLOCK_KEY.fullmatch(key)
    if m and m.group(2) in _T5_BLOCK:
        return f"encoder.block.{m.group(1)}.{_T5_BLOCK[m.group(2)]}"
    return None


def t5_original_to_transformers(state: dict[str, torch.Tensor], source: str = "umT5 checkpoint") -> dict:
    """Wan `T5Encoder` state dict -> `UMT5EncoderModel` state dict (the tied `encoder.embed_tokens` included)."""
    out = _rename_all(state, _t5_name, source)
    if "shared.weight" in out:
        out["encoder.embed_tokens.weight"] = out["shared.weight"]
    return out


def umt5_config_from_original(state: dict[str, torch.Tensor]):
    """The UMT5 encoder config implied by the tensor shapes of a Wan `T5Encoder` state dict (Wan: umt5_xxl)."""
    from transformers import UMT5Config

    layers = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.fullmatch(k))}
    num_buckets, num_heads = state["blocks.0.pos_embedding.embedding.weight"].shape
    vocab, d_model = state["token_embedding.weight"].shape
    return UMT5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=state["blocks.0.attn.q.weight"].shape[0] // num_heads,
        d_ff=state["blocks.0.ffn.fc1.weight"].shape[0],
        num_layers=len(layers),
        num_heads=num_heads,
        relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=128,  # Wan's T5RelativeEmbedding max_dist
        feed_forward_proj="gated-gelu",  # GELU with the tanh approximation, as Wan's
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
    )


# --------------------------------------------------------------------------------------------- VAE

_RESIDUAL = (
    ("residual.0.gamma", "norm1.gamma"),
    ("residual.2.", "conv1."),
    ("residual.3.gamma", "norm2.gamma"),
    ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
)
_VAE_QUANT = (("conv1.", "quant_conv."), ("conv2.", "post_quant_conv."))
_CODER = re.compile(r"(encoder|decoder)\.(.+)")
_MIDDLE = {"0": "mid_block.resnets.0.", "1": "mid_block.attentions.0.", "2": "mid_block.resnets.1."}


def _inside_block(rest: str) -> str:
    for old, new in _RESIDUAL:
        if rest.startswith(old):
            return new + rest[len(old) :]
    return rest


def _vae_name(key: str, num_res_blocks: int) -> str | None:
    for old, new in _VAE_QUANT:
        if key.startswith(old):
            return new + key[len(old) :]
    m = _CODER.fullmatch(key)
    if m is None:
        return None
    coder, rest = m.groups()
    if rest.startswith("conv1."):
        return f"{coder}.conv_in.{rest[len('conv1.') :]}"
    if rest == "head.0.gamma":
        return f"{coder}.norm_out.gamma"
    if rest.startswith("head.2."):
        return f"{coder}.conv_out.{rest[len('head.2.') :]}"
    if mm := re.fullmatch(r"middle\.([012])\.(.+)", rest):
        return f"{coder}.{_MIDDLE[mm.group(1)]}{_inside_block(mm.group(2))}"
    if coder == "encoder" and (mm := re.fullmatch(r"downsamples\.(\d+)\.(.+)", rest)):
        return f"encoder.down_blocks.{mm.group(1)}.{_inside_block(mm.group(2))}"
    if coder == "decoder" and (mm := re.fullmatch(r"upsamples\.(\d+)\.(.+)", rest)):
        level, j = divmod(int(mm.group(1)), num_res_blocks + 2)
        if j <= num_res_blocks:
            return f"decoder.up_blocks.{level}.resnets.{j}.{_inside_block(mm.group(2))}"
        return f"decoder.up_blocks.{level}.upsamplers.0.{mm.group(2)}"
    return None


def vae_original_to_diffusers(
    state: dict[str, torch.Tensor], num_res_blocks: int = 2, source: str = "VAE checkpoint"
) -> dict[str, torch.Tensor]:
    """Wan `WanVAE_` state dict (`Wan2.1_VAE.pth`) -> diffusers `AutoencoderKLWan` state dict."""
    return _rename_all(state, lambda k: _vae_name(k, num_res_blocks), source)


# --------------------------------------------------------------------------------------------- loading


def load_exact(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Assign `state` to `model` (built on the meta device or not); any missing, unexpected or wrongly shaped
    tensor raises one ValueError listing all of them, before anything is assigned."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        (label, items)
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
        if items
    ]
    if problems:
        text = "; ".join(
            f"{label} ({len(items)}): " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else "")
            for label, items in problems
        )
        raise ValueError(f"{source} does not match the model: {text}")
    model.load_state_dict(state, strict=True, assign=True)


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """`"bfloat16"` / `"float32"` / `"float16"` (or a torch.dtype) -> torch.dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name not in ("bfloat16", "float32", "float16"):
        raise ValueError(f"dtype must be one of bfloat16, float32, float16; got {name!r}")
    return getattr(torch, name)
