"""Can a toy DiT learn the direction word? Train in a plain loop and print, every 200 steps, the loss at high noise
with the right / opposite direction word (same clips, same noise). The README's trials (~3 min each on 2 cores):

D=experiments/teacher_toy/direction_learnability.py
python $D --world one --frames 9 --save one600.pt          # direction-only world: a gap from step 400
python $D --world one --frames 9 --seed 1                  # another seed: a gap by step 600
python $D --world one --frames 21                          # 21-frame clips: no gap by step 600
python $D --world color --frames 9                         # colour varies too: no gap (likewise background; shape: a gap)
python $D --world all --frames 9 --init one600.pt --steps 1000   # the full world after the warm-up: a wide gap
python $D --world all --frames 13 --steps 700              # the full world from scratch: no gap
"one": a red circle on black, only the direction varies; "all": every training attribute varies.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from direction_probe import OPPOSITE, velocity_loss  # this folder's probe (the script's folder is on sys.path)
from omegaconf import OmegaConf

from src.training.teacher import TeacherTask
from src.worlds.toy.shapes import prompt_from_attributes, render_video, sample_attributes

CONF = Path(__file__).resolve().parents[2] / "conf"
ONE = {"shape": "circle", "color": "red", "background": "black"}


def attributes(rng: np.random.Generator, vary: set[str]) -> dict:
    """A training attribute set in which only the attributes in `vary` differ from ONE (and the direction)."""
    sampled = sample_attributes(rng)
    return {**{k: (sampled[k] if k in vary else v) for k, v in ONE.items()}, "direction": sampled["direction"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default="one",
                        help="'one', 'all', or the attributes that vary besides the direction, e.g. 'color,shape'")
    parser.add_argument("--init", type=Path, help="start from these weights (a state dict saved by --save)")
    parser.add_argument("--save", type=Path, help="save the final weights here")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--shift", type=float, default=8.0, help="training timestep shift")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="initialisation and data seed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    world = OmegaConf.load(CONF / "world" / "toy.yaml")
    model = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "toy.yaml"))
    model.update(dim=args.width, ffn_dim=4 * args.width)
    vary = set(ONE) if args.world == "all" else set() if args.world == "one" else set(args.world.split(","))
    if not vary <= set(ONE):
        raise SystemExit(f"--world: unknown attributes {sorted(vary - set(ONE))}; choose from {sorted(ONE)}")
    task = TeacherTask(model=model, text_encoder=OmegaConf.to_container(world.text_encoder),
                       codec=OmegaConf.to_container(world.codec), timestep_shift=args.shift)
    if args.init:
        task.model.load_state_dict(torch.load(args.init, weights_only=True))
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=1e-3, weight_decay=0.01, betas=(0.9, 0.99))

    probe_rng = np.random.default_rng(123)
    probe_attrs = [attributes(probe_rng, vary) for _ in range(32)]
    x0 = task.codec.encode(torch.stack([render_video(a, args.frames, seed=i) for i, a in enumerate(probe_attrs)]))
    right, _ = task.text_encoder.encode([prompt_from_attributes(a) for a in probe_attrs])
    opposite, _ = task.text_encoder.encode(
        [prompt_from_attributes({**a, "direction": OPPOSITE[a["direction"]]}) for a in probe_attrs])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def probe() -> str:
        losses = {t: [velocity_loss(task.model, x0, noise, t, c) for c in (right, opposite)] for t in (900, 960, 990)}
        return "  ".join(f"t{t} right/opposite {r:.4f}/{o:.4f}" for t, (r, o) in losses.items())

    rng = np.random.default_rng(args.seed)
    start = time.time()
    for step in range(1, args.steps + 1):
        attrs = [attributes(rng, vary) for _ in range(16)]
        pixels = torch.stack([render_video(a, args.frames, seed=int(rng.integers(1 << 30))) for a in attrs])
        loss = task.flow_matching_loss(pixels, [prompt_from_attributes(a) for a in attrs], iteration=step)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.model.parameters(), 1.0)
        optimizer.step()
        if step % 200 == 0:
            print(f"step {step} ({time.time() - start:.0f} s) loss {loss.item():.3f}  {probe()}", flush=True)
    if args.save:
        torch.save(task.model.state_dict(), args.save)


if __name__ == "__main__":
    main()
