"""A few DMD iterations of the Wan2.1 1.3B architecture (random weights; a random 1.3B teacher stand-in) under
`deepspeed_zero2` with optimizer offload on one GPU: peak GPU memory and seconds per iteration -> a JSON file here.

    DS_ACCELERATOR=cuda torchrun --nproc_per_node=1 --master_addr=127.0.0.1 --master_port=29511 \
        experiments/distributed/bench_zero2_offload.py --out experiments/distributed/zero2_offload_1gpu.json

Needs a CUDA GPU and `pip install -e '.[deepspeed]'`. Latent 16 x 60 x 104 (480 x 832 pixels), `--frames` latent
frames (21 = 5 s), the toy text encoder at umT5's shape (512 x 4096) instead of umT5-XXL, batch 1, the HiAR
step-first sampler, forward-KL off (no ODE pairs are needed). The first iteration (engine warm-up) is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import lightning as L
import torch

from src.distributed.strategies import DeepSpeedEnginesStrategy
from src.training.distill import DistillTask

WAN_1_3B = dict(dim=1536, ffn_dim=8960, freq_dim=256, num_heads=12, num_layers=30, in_dim=16, out_dim=16, text_len=512,
                text_dim=4096, patch_size=[1, 2, 2], eps=1e-6)
SAMPLER = dict(order="step_first", steps=[1000, 750, 500, 250], warp=True, shift=5.0, frames_per_block=3, window=21,
               sink=0, context_level="next", renoise=True, context_noise=0.0, hybrid_steps=2)


def world() -> dict:
    return {
        "name": "bench_1.3b", "frames_per_block": 3, "latent": {"channels": 16, "height": 60, "width": 104},
        "student": WAN_1_3B, "critic": WAN_1_3B, "teacher": WAN_1_3B, "teacher_checkpoint": None, "critic_init": None,
        "negative_prompt": "",
        "text_encoder": {"_target_": "src.worlds.toy.text.ToyTextEncoder", "text_len": 512, "text_dim": 4096, "seed": 0},
        "codec": {"_target_": "src.worlds.toy.codec.ToyCodec", "factor": 2},  # unused in training
    }


class Prompts(torch.utils.data.IterableDataset):
    def __iter__(self):
        while True:
            yield {"prompt": ["a red panda climbing a tree in the rain"]}


class Timer(L.Callback):
    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        torch.cuda.synchronize()
        if batch_idx == 1:
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--frames", type=int, default=21)
    parser.add_argument("--gen-update-ratio", type=int, default=1, help="1: every iteration updates the generator")
    parser.add_argument("--no-offload", action="store_true")
    parser.add_argument("--out", default="experiments/distributed/zero2_offload_1gpu.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_zero2_offload needs a CUDA GPU")

    torch.manual_seed(0)
    task = DistillTask(world=world(), sampler=SAMPLER, num_frames=args.frames, gen_update_ratio=args.gen_update_ratio,
                       fkl={"weight": 0.0}, optim={"lr_generator": 2e-6, "lr_critic": 3e-7},  # the Wan world's
                       ema={"start": 10**9})
    timer = Timer()
    steps = sum(1 + (i % args.gen_update_ratio == 0) for i in range(args.iterations))
    strategy = DeepSpeedEnginesStrategy(stage=2, offload_optimizer=not args.no_offload, bf16=True,
                                        frozen_dtype="bfloat16")
    trainer = L.Trainer(accelerator="cuda", devices=1, strategy=strategy, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer], default_root_dir="/tmp/bench_zero2_offload")
    trainer.fit(task, torch.utils.data.DataLoader(Prompts(), batch_size=None))

    timed = timer.times[1:]
    result = {
        "device": torch.cuda.get_device_name(), "strategy": "deepspeed_zero2", "offload_optimizer": not args.no_offload,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")), "model": "Wan2.1-T2V-1.3B architecture, random weights",
        "teacher": "1.3B stand-in, bf16", "latent_frames": args.frames, "latent": [16, 60, 104], "batch_per_gpu": 1,
        "gen_update_ratio": args.gen_update_ratio, "iterations_timed": len(timed),
        "seconds_per_iteration": sum(timed) / max(len(timed), 1), "seconds_each": timer.times,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "losses": {k: float(v) for k, v in trainer.callback_metrics.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
