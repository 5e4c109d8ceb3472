"""Does the teacher use the direction word? Flow-matching loss on held-in clips with the right prompt, the opposite
direction word, the empty prompt, and the clip played backwards, at fixed noise levels and the same noise.

python experiments/teacher_toy/direction_probe.py --teacher assets/toy_teacher.safetensors --timesteps 900 960 985
python experiments/teacher_toy/direction_probe.py --teacher CKPT --warmup-world    # clips of the warm-up world
A teacher that ties the word to motion has a lower loss with the right word than with the opposite one at high noise,
where the trajectory is decided; equal columns mean the word is ignored. Also printed, at t=900/960: how much the
output moves (rms) when one attribute word is swapped, and the share of cross-attention each prompt word receives.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import OmegaConf

from src.flow_matching import add_noise
from src.training.teacher import load_teacher
from src.worlds.toy.shapes import prompt_from_attributes, render_video, sample_attributes

WORLD_CONFIG = Path(__file__).resolve().parents[2] / "conf" / "world" / "toy.yaml"
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def velocity_loss(model, x0: torch.Tensor, noise: torch.Tensor, t: int, context: torch.Tensor) -> float:
    """The flow-matching loss (v = noise - x0) at one noise level for every clip of the batch, under `context`."""
    t_batch = torch.full((len(x0),), float(t))
    return ((model(add_noise(x0, noise, t_batch), t_batch, context) - (noise - x0)) ** 2).mean().item()


@torch.no_grad()
def probe(model, timesteps: list[int], num_videos: int = 32, num_frames: int = 21, seed: int = 1,
          fixed: dict | None = None) -> dict:
    world = OmegaConf.load(WORLD_CONFIG)
    text_encoder, codec = hydra.utils.instantiate(world.text_encoder), hydra.utils.instantiate(world.codec)
    rng = np.random.default_rng(seed)
    attrs = [sample_attributes(rng, fixed) for _ in range(num_videos)]
    x0 = codec.encode(torch.stack([render_video(a, num_frames, seed=i) for i, a in enumerate(attrs)]))
    prompts = {
        "right_word": [prompt_from_attributes(a) for a in attrs],
        "opposite_word": [prompt_from_attributes({**a, "direction": OPPOSITE[a["direction"]]}) for a in attrs],
        "empty_prompt": [world.negative_prompt] * num_videos,
    }
    contexts = {name: text_encoder.encode(p)[0] for name, p in prompts.items()}
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    results = {}
    for t in timesteps:
        row = {name: velocity_loss(model, x0, noise, t, context) for name, context in contexts.items()}
        row["played_backwards"] = velocity_loss(model, x0.flip(1), noise, t, contexts["right_word"])
        results[str(t)] = row
    results["output_change_per_swap_t900"] = word_swaps(model, text_encoder, x0.shape, 900)
    results["cross_attention_share_t960"] = attention_shares(model, text_encoder, x0[:16], 960)
    return results


SWAPS = {"direction": ("left", "right"), "color": ("red", "green"), "shape": ("circle", "square"),
         "background": ("black", "gray")}
BASE = {"shape": "circle", "color": "red", "background": "black", "direction": "left"}


def word_swaps(model, text_encoder, shape, t: int) -> dict:
    """rms change of the output when one attribute of a fixed prompt is swapped (same noisy input)."""
    x = torch.randn(1, *shape[1:], generator=torch.Generator().manual_seed(0))
    t = torch.tensor([float(t)])
    base = model(x, t, text_encoder.encode([prompt_from_attributes(BASE)])[0])
    out = {}
    for key, (_, other) in SWAPS.items():
        swapped = model(x, t, text_encoder.encode([prompt_from_attributes({**BASE, key: other})])[0])
        out[key] = (swapped - base).pow(2).mean().sqrt().item()
    return out


def attention_shares(model, text_encoder, x0, t: int) -> dict:
    """Mean cross-attention weight on each word of the prompts (all layers and heads), from the modules' own q/k."""
    attrs = {"a": 0, "color": 1, "shape": 2, "moving": 3, "direction": 4, "on": 5}
    prompts = [prompt_from_attributes(BASE)] * len(x0)
    context, mask = text_encoder.encode(prompts)
    weights = []

    def capture(module, args):
        x, text = args[0], args[1]
        q = module.norm_q(module.q(x)).unflatten(-1, (module.num_heads, module.head_dim))
        k, _ = module.text_kv(text)
        weights.append(torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / module.head_dim**0.5, -1).mean((0, 1, 2)))

    hooks = [block.cross_attn.register_forward_pre_hook(capture) for block in model.blocks]
    try:
        t_batch = torch.full((len(x0),), float(t))
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))  # seeded: the shares reproduce
        model(add_noise(x0, noise, t_batch), t_batch, context)
    finally:
        for hook in hooks:
            hook.remove()
    share = torch.stack(weights).mean(0)
    words = int(mask[0].sum())
    out = {name: share[i].item() for name, i in attrs.items()}
    out["background words"] = share[6:words].sum().item()
    out["padding"] = share[words:].sum().item()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="safetensors from export_teacher, or a teacher_toy .ckpt (EMA)")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[900, 960, 985])
    parser.add_argument("--videos", type=int, default=32)
    parser.add_argument("--warmup-world", action="store_true",
                        help="probe clips of conf/experiment/teacher_toy.yaml's warm-up world (its attributes, frames)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_teacher(args.teacher)
    world = {}
    if args.warmup_world:
        data = OmegaConf.load(WORLD_CONFIG.parents[1] / "experiment" / "teacher_toy.yaml").data
        world = {"fixed": OmegaConf.to_container(data.warmup_attributes), "num_frames": data.warmup_frames}
    print(json.dumps(probe(model, args.timesteps, args.videos, **world), indent=1))


if __name__ == "__main__":
    main()
