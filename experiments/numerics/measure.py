"""The size of each numerical deviation from the official training step, on the toy world (issue 28, docs/fidelity.md).

    flock /tmp/hiar-cpu.lock env PYTHONPATH=$PWD python -m experiments.numerics.measure probes [--deviations ...]
    flock /tmp/hiar-cpu.lock env PYTHONPATH=$PWD python -m experiments.numerics.measure cost [--wan]

probes: one DMD generator loss (and one critic loss) of `experiment=hiar_fkl` on the toy world -- its shipped teacher as
teacher, critic and generator weights (a tiny trained DiT: 4 layers, width 128), 21 frames, batch 1 -- computed twice
with the same weights, prompts, exit step and random draws, once with the project's choice and once with the official
one, one deviation at a time; then everything at once (`numerics=official`). Reported: relative difference of the loss
|L_a - L_b| / |L_b|, of the gradient ||g_a - g_b|| / ||g_b||, and the gradients' cosine, per seed and exit step.

cost: the generator update's peak live memory and time, detached vs official cache gradient: measured on CPU on the toy
world (src.perf.estimate's tracker on real tensors, `--measure`) and estimated at the paper's scale (Wan 1.3B student,
bf16, activation checkpointing; fake tensors).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from src.io import atomic_write_text
from src.perf.estimate import compose, estimate_dmd_iteration, measure_dmd_iteration
from src.sampling.ode import sample_ode
from src.training.distill import DistillTask
from src.worlds.toy.shapes import training_prompts

HERE = Path(__file__).resolve().parent
BASE = ["experiment=hiar_fkl", "task.generator_init=null", "task.num_frames=21"]
# name -> (the project's overrides, the official ones, whether the critic's loss can differ); fKL off where it is not
# the subject (it would only dilute the relative difference)
DEVIATIONS = {
    "cache_gradient": (["fkl.weight=0"], ["fkl.weight=0", "task.cache_gradient=official"], False),
    "sigma_lookup": (["fkl.weight=0"], ["fkl.weight=0", "task.dmd.sigma_lookup=official_grid"], True),
    "fkl_attention": ([], ["fkl=causal"], False),
    "all": ([], ["numerics=official"], True),
}


def build_task(overrides: list[str]) -> DistillTask:
    cfg = compose([*BASE, *overrides])
    kwargs = OmegaConf.to_container(cfg.task, resolve=True)
    kwargs.pop("_target_")
    kwargs.update(export_dir=None)
    torch.manual_seed(0)
    return DistillTask(**kwargs)


def teacher_pairs(task: DistillTask, prompts: list[str], seed: int) -> dict:
    """The forward-KL batch the ODE-pair stage would write for these prompts: the toy teacher's 48-step shift-8
    trajectory (the world's ODE guidance), states at indices 0, 12, 24, 36, 48."""
    cond, uncond = task.encode_text(prompts)
    c, h, w = task.latent_shape
    _, states = sample_ode(task.teacher, cond, shape=(len(prompts), task.hparams.num_frames, c, h, w),
                           generator=torch.Generator().manual_seed(seed), uncond_context=uncond[:1], num_steps=48,
                           shift=8.0, guidance_scale=4.0, return_states_at=[0, 12, 24, 36, 48])
    from src.flow_matching import euler_grid

    grid = euler_grid(48, 8.0) / 1000
    sigmas = torch.tensor([[float(grid[i]) for i in (0, 12, 24, 36, 48)]] * len(prompts))
    return {"trajectory": torch.stack([states[i] for i in (0, 12, 24, 36, 48)], 1), "sigmas": sigmas}


def loss_and_gradient(task: DistillTask, fn, batch: dict, exit_step: int, model: torch.nn.Module):
    model.zero_grad(set_to_none=True)
    loss, _ = fn(batch, [0], exit_step)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double()
    return float(loss), grad


def compare(a: tuple[float, torch.Tensor], b: tuple[float, torch.Tensor]) -> dict:
    """a: official, b: project."""
    return {"loss_rel": abs(a[0] - b[0]) / abs(b[0]), "grad_rel": float((a[1] - b[1]).norm() / b[1].norm()),
            "cosine": float(F.cosine_similarity(a[1], b[1], dim=0))}


def summary(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if isinstance(rows[0][k], float) and not k.startswith("t_")]
    return {k: {"min": min(r[k] for r in rows), "max": max(r[k] for r in rows),
                "mean": sum(r[k] for r in rows) / len(rows)} for k in keys}


def probes(seeds: int, names: list[str], path: Path) -> dict:
    """Each deviation's rows and summary, merged into `path` after each deviation (a partial run keeps its results)."""
    prompts = training_prompts(seeds, seed=123)
    out = json.loads(path.read_text()) if path.exists() else {"deviations": {}}
    out["setting"] = {"overrides": BASE, "world": "toy (assets/toy_teacher.safetensors for all three models)",
                      "batch": 1, "seeds": seeds, "exit_steps": [0, 1, 2, 3]}
    for name in names:
        ours, official, critic_differs = DEVIATIONS[name]
        start = time.perf_counter()
        tasks = [build_task(ours), build_task(official)]
        fkl = any(t.hparams.fkl["weight"] > 0 for t in tasks)
        rows = []
        for s in range(seeds):
            batch = {"prompt": [prompts[s]], "critic_prompt": [prompts[(s + 1) % seeds]]}
            batch.update(teacher_pairs(tasks[0], [prompts[s]], s) if fkl else {})
            for exit_step in range(4):
                for task in tasks:  # the iteration keys every random draw (rollout noise, t, DMD noise)
                    task.iteration.fill_(s)
                gen = [loss_and_gradient(t, t.generator_loss, batch, exit_step, t.generator) for t in tasks]
                zeros = torch.zeros(1, tasks[0].hparams.num_frames, *tasks[0].latent_shape)
                row = {"seed": s, "exit_step": exit_step,
                       "t_dmd": float(tasks[0].noisy(zeros, "dmd_noise", [0])[2])}
                row.update({f"generator_{k}": v for k, v in compare(*gen).items()})
                if critic_differs:
                    critic = [loss_and_gradient(t, t.critic_update_loss, batch, exit_step, t.critic) for t in tasks]
                    row["t_critic"] = float(tasks[0].noisy(zeros, "critic_noise", [0])[2])
                    row.update({f"critic_{k}": v for k, v in compare(*critic).items()})
                rows.append(row)
                print(name, json.dumps(row), flush=True)
        out["deviations"][name] = {"project": ours, "official": official, "summary": summary(rows), "rows": rows,
                                   "seconds": time.perf_counter() - start,
                                   "command": f"python -m experiments.numerics.measure probes --seeds {seeds} "
                                              f"--deviations {name}"}
        atomic_write_text(path, json.dumps(out, indent=1))
    return out


def cost(wan: bool) -> dict:
    """CPU time is process time (the machine is shared: wall time would measure the neighbours)."""
    modes = {"detached": [], "official": ["task.cache_gradient=official"]}
    out = {"toy_cpu_measured": {}, **({"wan_1.3b_estimated": {}} if wan else {})}
    for mode, extra in modes.items():
        overrides = [*BASE, "fkl.weight=0", *extra]
        start = time.process_time()
        gen = measure_dmd_iteration(overrides)["raw"]["updates"]["generator"]
        out["toy_cpu_measured"][mode] = {
            "overrides": overrides, "generator_peak_bytes": gen["peak"],
            "generator_activations_bytes": gen["peak_by_category"].get("activations", 0),
            "generator_flops": gen["flops"], "iteration_process_seconds": time.process_time() - start}
        if wan:
            overrides = ["experiment=hiar_fkl", "world=wan2.1_1.3b", "trainer=gpu_bf16", "task.generator_init=null",
                         *extra]
            est = estimate_dmd_iteration(overrides)["updates"]["generator"]
            out["wan_1.3b_estimated"][mode] = {"overrides": overrides,
                                               **{k: est[k] for k in ("activations_gib", "kv_cache_gib", "peak_gib",
                                                                      "tflops")}}
        print(mode, json.dumps({k: v[mode] for k, v in out.items()}), flush=True)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("probes", "cost"))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--deviations", nargs="+", choices=list(DEVIATIONS), default=list(DEVIATIONS))
    parser.add_argument("--wan", action="store_true", help="cost: also estimate at the Wan 1.3B scale (fake tensors)")
    parser.add_argument("--out", help="JSON file (default: experiments/numerics/<what>.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    path = Path(args.out or HERE / f"{args.what}.json")
    if args.what == "probes":
        probes(args.seeds, args.deviations, path)
    else:
        result = cost(args.wan)
        result["command"] = "python -m experiments.numerics.measure cost" + (" --wan" if args.wan else "")
        atomic_write_text(path, json.dumps(result, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
