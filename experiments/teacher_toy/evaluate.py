"""Oracle evaluation of the toy teacher on held-out prompts.

python experiments/teacher_toy/evaluate.py --teacher assets/toy_teacher.safetensors --prompts 32 --seeds 2 \
    --out experiments/teacher_toy/results.json
(--teacher also takes a teacher_toy Lightning checkpoint: its EMA weights are evaluated, without exporting.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import OmegaConf

from src.sampling.ode import sample_videos
from src.training.teacher import load_teacher
from src.worlds.toy.oracle import analyse_frames, score_video, score_videos
from src.worlds.toy.shapes import heldout_prompts, parse_prompt

WORLD_CONFIG = Path(__file__).resolve().parents[2] / "conf" / "world" / "toy.yaml"


def evaluate(model, prompts: list[str], seeds: list[int], num_frames: int, batch_size: int, **ode_kwargs) -> dict:
    world = OmegaConf.load(WORLD_CONFIG)
    text_encoder = hydra.utils.instantiate(world.text_encoder)
    codec = hydra.utils.instantiate(world.codec)
    latent_shape = (world.latent.channels, world.latent.height, world.latent.width)
    videos, video_prompts = [], []
    for seed in seeds:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            videos.extend(sample_videos(model, text_encoder, codec, batch, num_frames, latent_shape, seed=seed + start,
                                        negative_prompt=world.negative_prompt, **ode_kwargs))
            video_prompts.extend(batch)
    results = score_videos(videos, video_prompts)
    per_prompt, crossing = {}, []
    for video, prompt in zip(videos, video_prompts):
        fidelity = score_video(video, prompt)["fidelity"]
        per_prompt.setdefault(prompt, []).append(fidelity)
        if crosses_an_edge(video, prompt):
            crossing.append(fidelity)
    results["fidelity_per_prompt"] = {p: sum(v) / len(v) for p, v in per_prompt.items()}
    results["edge_crossing"] = {"videos": len(crossing), "fidelity": sum(crossing) / len(crossing) if crossing else None}
    return results


def crosses_an_edge(video: torch.Tensor, prompt: str) -> bool:
    """Whether the object's centroid wraps around the frame between two frames where the oracle finds it."""
    frames = video.float()
    position = analyse_frames(frames, parse_prompt(prompt))["position"]
    jumps = np.abs(np.diff(position, axis=0)) > np.array(frames.shape[-1:-3:-1]) / 2  # (x, y) against (W, H)
    return bool(jumps.any())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="safetensors from export_teacher, or a teacher_toy .ckpt (EMA)")
    parser.add_argument("--prompts", type=int, default=32, help="how many held-out prompts")
    parser.add_argument("--seeds", type=int, default=2, help="videos per prompt")
    parser.add_argument("--frames", type=int, default=21)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--shift", type=float, default=8.0)
    parser.add_argument("--cfg", type=float, default=6.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the results JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_teacher(args.teacher)
    started = time.time()
    results = evaluate(model, heldout_prompts(args.prompts), list(range(args.seeds)), args.frames, args.batch_size,
                       num_steps=args.steps, shift=args.shift, guidance_scale=args.cfg)
    results["settings"] = {**vars(args), "seconds": round(time.time() - started, 1)}
    summary = {k: results[k] for k in ("fidelity", "object_found", "direction_agreement", "motion", "smoothness",
                                       "object_color_error", "shape_agreement", "background_color_error", "speckle",
                                       "num_videos", "edge_crossing")}
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
