"""`make bench-gpu`: the Wan2.1 1.3B architecture (random bf16 weights) at 832x480 on one CUDA GPU, as JSON.

For 21 and 81 latent frames (81 and 321 pixel frames) and each sampler -- block-first (Self-Forcing), step-first
(HiAR) and the single-device wavefront (src/sampling/wavefront.py) -- it measures

* the DiT alone: latent / pixel frames per second, first-block latency, peak memory, model FLOPs and MFU;
* end to end: the same generation with every block decoded by the streaming VAE decoder as soon as it is final
  (a randomly initialised diffusers ``AutoencoderKLWan`` of the Wan2.1 shape, loaded through ``WanVAE``).

FLOPs are counted analytically from the shapes of every forward (``FLOPS_FORMULA``); nothing is downloaded. Each
sampler runs once untimed (end to end, at the shortest length) before the timings. ``--smoke`` runs the same code on
CPU with a tiny model, tiny VAE and float32, to check the code path without a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from src.distributed.parallelize import compile_blocks
from src.models.attention import GroupedAttention, attention_kernel
from src.models.wan import WanConfig, WanDiT
from src.perf.sampler_bench import ForwardCounter
from src.sampling.noise import NoiseBank
from src.sampling.orders import SamplerConfig, forward_count, generate_blocks
from src.sampling.wavefront import wavefront_blocks
from src.worlds.wan.vae import WAN21_VAE_CONFIG, WanVAE

ROOT = Path(__file__).resolve().parents[2]
MODEL_PRESET = ROOT / "conf" / "model" / "wan2.1-t2v-1.3b.yaml"
# name -> (order, fuse_writes); "wavefront" is src/sampling/wavefront.py (always fused, one batched forward per tick)
SAMPLER_VARIANTS = {"block_first": ("block_first", False), "step_first": ("step_first", False),
                    "block_first_fused": ("block_first", True), "step_first_fused": ("step_first", True),
                    "wavefront": ("wavefront", True)}
SAMPLERS = tuple(SAMPLER_VARIANTS)
NO_GPU = "needs a CUDA GPU; use --smoke on CPU to check the code path"

FULL = {"latent_shape": (16, 60, 104), "frames": (21, 81), "dtype": "bfloat16", "vae": WAN21_VAE_CONFIG}
SMOKE = {
    "model": WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_len=16, text_dim=32),
    "latent_shape": (16, 8, 8),
    "frames": (6, 9),
    "dtype": "float32",
    "vae": dict(WAN21_VAE_CONFIG, base_dim=8),
}

# Wan2.1's VAE turns 1 + k latent frames into 1 + 4k pixel frames (WanVAE.num_pixel_frames), counted without a VAE
WAN_TEMPORAL_COMPRESSION = 2 ** sum(WAN21_VAE_CONFIG["temperal_downsample"])


def pixel_frame_count(num_latent_frames: int) -> int:
    return 1 + WAN_TEMPORAL_COMPRESSION * (num_latent_frames - 1)


FLOPS_FORMULA = (
    "per DiT forward with B batch rows of Lq query tokens each, Lk self-attention keys per row (cached frames + the "
    "chunk, masked and padding keys included: what the kernel is given) and T = text_len text keys: "
    "FLOPs = 2*B*Lq*P + num_layers*4*B*Lq*(Lk + T)*dim, where P = num_layers*(6*dim^2 + 2*dim*ffn_dim) "
    "+ dim*in_dim*prod(patch_size) + dim*out_dim*prod(patch_size) are the matmul weights one query token passes "
    "(self-attn q,k,v,o; cross-attn q,o; FFN; patch embedding; head). Not counted: the text embedding and the "
    "cross-attention text k,v (computed once per KV cache), the time embedding, norms, RoPE, softmax, biases."
)


# --------------------------------------------------------------------------------------------- FLOPs


def matmul_params_per_token(cfg: WanConfig) -> int:
    """P of FLOPS_FORMULA."""
    d, patch = cfg.dim, math.prod(cfg.patch_size)
    return cfg.num_layers * (6 * d * d + 2 * d * cfg.ffn_dim) + d * cfg.in_dim * patch + d * cfg.out_dim * patch


def forward_flops(cfg: WanConfig, rows: int, lq: int, lk: int) -> int:
    """FLOPS_FORMULA for one forward."""
    return 2 * rows * lq * matmul_params_per_token(cfg) + cfg.num_layers * 4 * rows * lq * (lk + cfg.text_len) * cfg.dim


class ForwardShapes:
    """Records (rows, Lq, Lk) of every DiT forward (per cell for the wavefront) from the first block's inputs, which
    both ``WanDiT.forward`` and the wavefront's batched forward call exactly once per forward. Lk: the keys per query
    row the attention kernels are given (the widest query block's visible keys: no masked or padding keys remain)."""

    def __init__(self, model: WanDiT):
        self.model = model
        self.records: list[tuple[int, int, int]] = []
        self.forwards = 0

    def _hook(self, module, args):
        x, attn = args[0], args[4]
        self.forwards += 1
        lq = x.shape[1]
        if isinstance(attn, GroupedAttention):
            for plan, rows in zip(attn.plans, attn.slices):
                self.records.append((rows.stop - rows.start, lq, plan.key_tokens))
        else:
            self.records.append((x.shape[0], lq, attn.key_tokens))

    def __enter__(self) -> ForwardShapes:
        self._handle = self.model.blocks[0].register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()

    @property
    def tokens(self) -> int:
        return sum(rows * lq for rows, lq, _ in self.records)

    def flops(self) -> int:
        return sum(forward_flops(self.model.cfg, *r) for r in self.records)


# --------------------------------------------------------------------------------------------- runs


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    """torch.cuda.max_memory_allocated since the last reset; None on CPU (no allocator statistics)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def variant_config(sampler: str, cfg: SamplerConfig) -> SamplerConfig:
    """``cfg`` under a SAMPLER_VARIANTS entry's order and fuse_writes (the wavefront keeps cfg's order)."""
    order, fuse = SAMPLER_VARIANTS[sampler]
    return replace(cfg.with_order(None if order == "wavefront" else order), fuse_writes=fuse)


def final_blocks(sampler: str, model: WanDiT, context: torch.Tensor, num_frames: int, latent_shape: Sequence[int],
                 cfg: SamplerConfig, seed: int, counter: ForwardCounter) -> Iterator[tuple[int, torch.Tensor]]:
    """(block, x0) as each block becomes final; block-/step-first see the model through ``counter``."""
    bank = NoiseBank(seed)
    if sampler == "wavefront":
        return wavefront_blocks(model, context, num_frames, latent_shape, cfg, bank)
    return generate_blocks(counter, context, num_frames, latent_shape, variant_config(sampler, cfg), bank)


def expected_forwards(sampler: str, cfg: SamplerConfig, num_blocks: int) -> int:
    """forward_count for block-/step-first (fused or not); N + S - 1 batched forwards (one per tick) for the
    wavefront."""
    if sampler == "wavefront":
        return num_blocks + cfg.num_steps - 1
    return forward_count(variant_config(sampler, cfg), num_blocks)


@torch.no_grad()
def timed_run(sampler: str, model: WanDiT, context: torch.Tensor, num_frames: int, latent_shape: Sequence[int],
              cfg: SamplerConfig, seed: int, codec: WanVAE | None) -> dict:
    """One generation, timed; with a codec every final block is decoded (streaming) before the next is waited for."""
    device = context.device
    counter = ForwardCounter(model)
    decoder = codec.streaming_decoder() if codec is not None else None
    synchronize(device)
    reset_peak_memory(device)
    with ForwardShapes(model) as shapes:
        start = time.perf_counter()
        first = None
        for _, x0 in final_blocks(sampler, model, context, num_frames, latent_shape, cfg, seed, counter):
            if decoder is not None:
                decoder.decode_next(x0)
            if first is None:
                synchronize(device)
                first = time.perf_counter() - start
        synchronize(device)
        total = time.perf_counter() - start
    return {
        "total_s": total,
        "first_block_latency_s": first,
        "peak_memory_bytes": peak_memory(device),
        "forwards": shapes.forwards if sampler == "wavefront" else counter.forwards,
        "tokens": shapes.tokens,
        "flops": shapes.flops(),
    }


def timing(run: dict, num_frames: int, pixel_frames: int) -> dict:
    """Throughput and latency of one timed run (DiT alone or end to end)."""
    return {
        "total_s": run["total_s"],
        "latent_frames_per_s": num_frames / run["total_s"],
        "pixel_frames_per_s": pixel_frames / run["total_s"],
        "first_block_latency_s": run["first_block_latency_s"],
        "peak_memory_bytes": run["peak_memory_bytes"],
    }


def bench_sampler(sampler: str, model: WanDiT, codec: WanVAE | None, context: torch.Tensor, num_frames: int,
                  latent_shape: Sequence[int], cfg: SamplerConfig, seed: int, peak_tflops: float,
                  end_to_end: bool = True) -> dict:
    """The DiT-only run and (unless ``end_to_end`` is off) the end-to-end run of one sampler at one length."""
    pixel_frames = pixel_frame_count(num_frames)
    num_blocks = num_frames // cfg.frames_per_block
    dit = timed_run(sampler, model, context, num_frames, latent_shape, cfg, seed, None)
    e2e = timed_run(sampler, model, context, num_frames, latent_shape, cfg, seed, codec) if end_to_end else None
    achieved = dit["flops"] / dit["total_s"]
    return {
        "num_latent_frames": num_frames,
        "num_pixel_frames": pixel_frames,
        "num_blocks": num_blocks,
        "forwards": dit["forwards"],
        "expected_forwards": expected_forwards(sampler, cfg, num_blocks),
        "tokens": dit["tokens"],
        "dit": {
            **timing(dit, num_frames, pixel_frames),
            "flops": dit["flops"],
            "achieved_tflops": achieved / 1e12,
            "mfu": achieved / (peak_tflops * 1e12),
        },
        "end_to_end": timing(e2e, num_frames, pixel_frames) if e2e is not None else None,
    }


# --------------------------------------------------------------------------------------------- set-up


def random_vae(config: dict, dtype: str, device: torch.device, seed: int) -> WanVAE:
    """A randomly initialised AutoencoderKLWan of ``config``, saved as a diffusers folder and loaded by WanVAE."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as folder:
        AutoencoderKLWan(**config).save_pretrained(folder)
        return WanVAE(folder, dtype=dtype).to(device).eval()


def machine(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version(),
            "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({"device_name": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                     "cudnn": torch.backends.cudnn.version(), "total_memory_bytes": props.total_memory,
                     "capability": f"{props.major}.{props.minor}"})
    else:
        info["device_name"] = "cpu"
    return info


def output_path(out: str, device_name: str) -> Path:
    """``--out`` itself when it names a .json file, else ``<out>/gpu_<device name>.json``."""
    path = Path(out)
    if path.suffix == ".json":
        return path
    return path / f"gpu_{re.sub(r'[^a-z0-9]+', '-', device_name.lower()).strip('-')}.json"


def run(args: argparse.Namespace) -> dict:
    setup = SMOKE if args.smoke else FULL
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = args.dtype or setup["dtype"]
    model_cfg = setup["model"] if args.smoke else WanConfig.from_dict(yaml.safe_load(MODEL_PRESET.read_text()))
    latent_shape = setup["latent_shape"]
    frames = args.frames or setup["frames"]
    cfg = SamplerConfig()
    bad = [f for f in frames if f % cfg.frames_per_block]
    if bad:
        raise SystemExit(f"--frames must be multiples of frames_per_block={cfg.frames_per_block}, got {bad}")

    torch.manual_seed(args.seed)
    with torch.device(device):
        model = WanDiT(model_cfg)
    model = model.to(getattr(torch, dtype)).eval().requires_grad_(False)
    if args.compile:
        compile_blocks(model)
    codec = random_vae(setup["vae"], dtype, device, args.seed)
    context = torch.randn(1, model_cfg.text_len, model_cfg.text_dim,
                          generator=torch.Generator().manual_seed(args.seed)).to(device)

    for sampler in SAMPLERS:  # warm-up (and compilation): one untimed end-to-end run each
        timed_run(sampler, model, context, min(frames), latent_shape, cfg, args.seed, codec)
    results = {
        str(f): {s: bench_sampler(s, model, codec, context, f, latent_shape, cfg, args.seed, args.peak_tflops,
                                  not args.no_end_to_end)
                 for s in SAMPLERS}
        for f in frames
    }
    probe = torch.empty(1, 1, model_cfg.num_heads, model_cfg.head_dim, dtype=getattr(torch, dtype), device=device)
    return {
        "machine": machine(device),
        "setup": {
            "smoke": args.smoke,
            "model": model_cfg.to_dict(),
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": dtype,
            "latent_shape": list(latent_shape),
            "pixel_size": [latent_shape[1] * codec.spatial_compression, latent_shape[2] * codec.spatial_compression],
            "tokens_per_frame": model.tokens_per_frame(*latent_shape[1:]),
            "sampler": {"steps": list(cfg.steps), "timesteps": cfg.timesteps, "frames_per_block": cfg.frames_per_block,
                        "window": cfg.window, "sink": cfg.sink, "context_level": cfg.context_level},
            "vae": {k: v for k, v in setup["vae"].items() if k not in ("latents_mean", "latents_std")},
            "vae_parameters": sum(p.numel() for p in codec.parameters()),
            "attention_kernel": attention_kernel(probe),
            "masked_passes": "flex_attention (compiled) BlockMask" if device.type == "cuda" else
            "unmasked calls per query block (LSE merge for sinks)",
            "compile": args.compile,
            "peak_tflops": args.peak_tflops,
            "flops_formula": FLOPS_FORMULA,
            "matmul_params_per_token": matmul_params_per_token(model_cfg),
            "seed": args.seed,
        },
        "results": results,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="experiments/bench",
                        help="a .json file, or a folder for gpu_<device name>.json (default: %(default)s)")
    parser.add_argument("--frames", type=int, nargs="+", help="latent frame counts (default 21 81; smoke 6 9)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the device's dense bf16 peak for MFU (default: H100 SXM, %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny model and VAE on CPU, float32: checks the code path")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="model and VAE dtype (default bfloat16; float32 with --smoke)")
    parser.add_argument("--compile", action="store_true", help="compile each transformer block (parallelize.py)")
    parser.add_argument("--no-end-to-end", action="store_true", help="DiT runs only (no VAE decoding runs)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit(NO_GPU)
    report = run(args)
    path = output_path(args.out, report["machine"]["device_name"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["results"], indent=2))
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
