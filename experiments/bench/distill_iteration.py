"""Seconds per toy DMD iteration at the toy recipe, for several ways of running the same training, in one process on
one machine (so the variants compare): the real `src.train` composition of `experiment=hiar_fkl` (generator, critic,
frozen teacher, step-first rollout, forward-KL), Lightning's fit loop, and a timer around every training batch.

    .venv/bin/python -m experiments.bench.distill_iteration --artifacts outputs/toy_ablation/artifacts \
        --out experiments/bench/distill_iteration.json

A variant is a list of Hydra overrides (VARIANTS). Per variant: `--warmup` iterations untimed (compilation, allocator
warm-up), then `--iterations` timed; reported separately for iterations with a generator update (rollout with
gradients + teacher + critic + forward-KL + the critic update) and critic-only ones, and combined at the recipe's
update ratio. Measured: wall seconds of `training_step` on this machine's cores (torch threads as the environment
sets them); nothing is computed from a model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir

from src.demo import ROOT
from src.distributed.parallelize import applied_settings
from src.distributed.strategies import dit_children
from src.io import atomic_write_text
from src.train import make_trainer

VARIANTS = {
    "eager float32 (the toy recipe)": [],
    # the Wan world's memory setting: what the toy world saves by leaving it off
    "activation checkpointing on": ["world.training.activation_checkpointing=true"],
    "compiled blocks (torch.compile, training)": ["parallelize.compile=true"],
}


class IterationTimer(L.Callback):
    def __init__(self):
        self.seconds: list[tuple[bool, float]] = []  # (generator update?, seconds)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = time.perf_counter()
        self.generator = int(pl_module.iteration) % pl_module.hparams.gen_update_ratio == 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds.append((self.generator, time.perf_counter() - self.start))


def time_variant(overrides: list[str], artifacts: Path, iterations: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=hiar_fkl", f"paths.artifacts_dir={artifacts}", f"paths.output_dir={tmp}",
            f"paths.log_dir={tmp}", "callbacks=none", "logger=[]", *overrides])
        ratio = int(cfg.task.gen_update_ratio)
        steps = sum(1 + (i % ratio == 0) for i in range(warmup + iterations))
        L.seed_everything(0, verbose=False)
        datamodule = hydra.utils.instantiate(cfg.data)
        module = hydra.utils.instantiate(cfg.task, _recursive_=False)
        timer = IterationTimer()
        # the run's own Trainer (src.train): its strategy applies conf/parallelize (checkpointing, compile), the variants
        trainer = make_trainer(cfg, accelerator="cpu", max_steps=steps, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
        trainer.fit(module, datamodule=datamodule)
    # what the strategy really applied to each trained DiT (a variant that applied nothing measures nothing)
    applied = {name: applied_settings(dit) for name, dit in dit_children(module).items()}
    timed = timer.seconds[warmup:]
    generator = [s for g, s in timed if g]
    critic = [s for g, s in timed if not g]
    per_iteration = (statistics.median(generator) + (ratio - 1) * statistics.median(critic)) / ratio
    return {"overrides": overrides, "applied": applied, "gen_update_ratio": ratio, "iterations_timed": len(timed),
            "warmup": warmup,
            "generator_iteration_s": {"median": statistics.median(generator), "all": generator},
            "critic_only_iteration_s": {"median": statistics.median(critic), "all": critic},
            "recipe_iteration_s": per_iteration, "iterations_per_s": 1 / per_iteration,
            "warmup_s": sum(s for _, s in timer.seconds[:warmup])}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, required=True, help="a folder with the toy ode_pairs and ode_init")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "bench" / "distill_iteration.json")
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args(argv)
    for stage in ("ode_pairs", "ode_init"):
        if not (args.artifacts / stage).is_dir():
            raise SystemExit(f"error: {args.artifacts / stage} is missing (make it with the toy chain, e.g. make demo)")
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
              "what": "wall seconds of training_step (median over timed iterations), toy world, experiment=hiar_fkl",
              "variants": {}}
    for name in args.variants:
        result["variants"][name] = time_variant(VARIANTS[name], args.artifacts.resolve(), args.iterations, args.warmup)
        atomic_write_text(args.out, json.dumps(result, indent=1))  # each variant as soon as it is measured
        v = result["variants"][name]
        print(f"{name}: generator iteration {v['generator_iteration_s']['median']:.2f} s, critic-only "
              f"{v['critic_only_iteration_s']['median']:.2f} s, {v['iterations_per_s']:.3f} iterations/s "
              f"at ratio {v['gen_update_ratio']} (warm-up {v['warmup_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
