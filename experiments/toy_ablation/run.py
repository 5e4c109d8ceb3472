"""The paper's ablations in the stationary toy world, at the toy distillation recipe (conf/world/toy.yaml: 200
iterations, a generator update every 2nd, generator lr 1e-4): Table 2 (context level t_c), Table 3 (forward-KL
variants, Self-Forcing weights sampled step-first, block-first Self-Forcing), the recipe sweep that chose the recipe,
and the Fig. 4 analogue (dynamics of checkpoints trained without forward-KL, one-step predictions in bidirectional vs
causal attention, Pearson r).

    .venv/bin/python -m experiments.toy_ablation.run all --budget-min 60   # train / evaluate what is missing, report
    .venv/bin/python -m experiments.toy_ablation.run report                # tables and plots from what exists

Resumable at every level: a student is trained only when its published output is missing or stale
(src/artifacts.py, as in `make demo`), an interrupted student resumes from its last checkpoint, an evaluation is run
only when its score file is missing, and `--budget-min` stops starting new work once that many minutes have passed.
All students share one set of ODE pairs and one ODE init (as in the paper, and the demo's sizes: the toy world's
defaults) and differ by experiment config and seed. Each evaluation: 81-frame (20 s) generations of 48 held-out prompts
x 2 noise seeds = 96 videos, with noise that neither training nor the demo draws, scored by the oracle per 4 s segment.
A cell is the mean over training seeds +- their standard error (one seed: the standard error over its videos, marked
*). Every row is also compared with the ODE init sampled the same way on the same videos (paired difference).
Outputs: outputs/toy_ablation/ (artifacts, runs, scores), and here results.{md,json}, plots/*.png and scores/: every
score file is kept in the repository (copied here by `report`, and back into --out before any work), so the tables are
rebuilt from the repository alone and a lost --out costs no evaluation. A row without any score file keeps its entry
of the previous results.json, marked as carried over (rows measured before the scores were kept).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from src.artifacts import stale_reason
from src.demo import ROOT, run, stage_config  # one stage runner for the demo and this study
from src.io import atomic_write_text

HERE = Path(__file__).resolve().parent
EVAL_PROMPTS, EVAL_NOISE_SEEDS, EVAL_FRAMES, EVAL_BATCH = 48, 2, 81, 16
EVAL_SEED = 3000  # batch b of an evaluation draws its noise from NoiseBank(EVAL_SEED + b); the demo uses seeds 0..15
MEASURES = ("fidelity", "direction_agreement", "object_found", "object_color_error", "shape_agreement", "speckle",
            "motion", "smoothness")
CURVES = ("fidelity", "direction_agreement", "object_found", "object_color_error", "speckle", "motion")

# Fig. 4: the no-forward-KL student trained 3x as long as the recipe, every 40th iteration kept
LONG_STEPS = 900  # optimizer steps = 600 iterations at gen_update_ratio 2
# The recipe sweep's other points (hiar_fkl is the chosen point): what the learning rate and the update ratio each add
OLD_RECIPE = ("world.training.gen_update_ratio=5", "world.training.lr_generator=2e-5", "trainer.max_steps=156")
RATIO_5 = ("world.training.gen_update_ratio=5", "trainer.max_steps=240")  # 200 iterations, 40 generator updates


@dataclass(frozen=True)
class Student:
    experiment: str
    overrides: tuple[str, ...] = ()


STUDENTS = {
    "self_forcing": Student("self_forcing"),
    "hiar": Student("hiar"),
    "hiar_fkl": Student("hiar_fkl"),
    "tc_current": Student("hiar_fkl", ("sampler.context_level=current",)),
    "tc_clean": Student("hiar_fkl", ("sampler.context_level=clean",)),
    "fkl_causal": Student("hiar_fkl", ("fkl=causal",)),
    "fkl_2steps": Student("hiar_fkl", ("fkl.num_steps=2",)),
    "recipe_old": Student("hiar_fkl", OLD_RECIPE),
    "recipe_ratio5": Student("hiar_fkl", RATIO_5),
    "hiar_long": Student("hiar", (f"trainer.max_steps={LONG_STEPS}",)),
    "hiar_fkl_official": Student("hiar_fkl", ("numerics=official",)),  # issue 28: the official training step
}
# trained with every seed in --seeds; the others with the first
MAIN_STUDENTS = ("self_forcing", "hiar", "hiar_fkl", "hiar_fkl_official")
# training order: every row's first seed, the recipe points, then more seeds, the long run last (the most expensive)
LAST_STUDENTS = ("hiar_long",)


@dataclass(frozen=True)
class Row:
    table: str
    name: str
    student: str
    sampling: tuple[str, ...]  # conf/generate.yaml overrides at inference: the order and the sampler's settings
    which: str = "auto"  # auto: the exported student (the EMA); generator: the raw generator of the last checkpoint

    def eval_key(self, seed: int) -> str:
        which = [] if self.which == "auto" else [f"@{self.which}"]
        return "__".join([f"{self.student}_s{seed}", *which,
                          *[o.replace("sampler.", "").replace("=", "-") for o in self.sampling]])


STEP_FIRST, BLOCK_FIRST = ("sampler=step_first",), ("sampler=block_first",)
RECIPE_TABLE = "The distillation recipe (fKL bidirectional, step-first)"
LONG_TABLE = "Without forward-KL, 3x longer (600 iterations)"
BASE_TABLE = "No distillation: the ODE init"
NUMERICS_TABLE = "Numerics: the project's training step vs the official one (docs/fidelity.md)"
ODE_INIT = "ode_init"  # not a student: the shared ODE init (artifacts/ode_init), evaluated like one
TABLE_2, TABLE_3 = "Table 2: context level t_c", "Table 3: forward-KL and hierarchical denoising"
PLOTS = {TABLE_2: "table2_segments.png", TABLE_3: "table3_segments.png", RECIPE_TABLE: "recipe_segments.png",
         LONG_TABLE: "long_segments.png", BASE_TABLE: "ode_init_segments.png", NUMERICS_TABLE: "numerics_segments.png"}
ROWS = [
    Row(TABLE_2, "t_c = t_j (current)", "tc_current", (*STEP_FIRST, "sampler.context_level=current")),
    Row(TABLE_2, "t_c = t_{j+1} (HiAR)", "hiar_fkl", STEP_FIRST),
    Row(TABLE_2, "t_c = 0 (clean)", "tc_clean", (*STEP_FIRST, "sampler.context_level=clean")),
    Row(TABLE_3, "fKL bidirectional, 1 step (HiAR)", "hiar_fkl", STEP_FIRST),
    Row(TABLE_3, "fKL causal, 1 step", "fkl_causal", STEP_FIRST),
    Row(TABLE_3, "fKL bidirectional, 2 steps", "fkl_2steps", STEP_FIRST),
    Row(TABLE_3, "w/o fKL", "hiar", STEP_FIRST),
    Row(TABLE_3, "SF weights sampled step-first (no retraining)", "self_forcing", STEP_FIRST),
    Row(TABLE_3, "block-first Self-Forcing", "self_forcing", BLOCK_FIRST),
    Row(RECIPE_TABLE, "old: ratio 5, generator lr 2e-5, 130 iterations (26 generator updates)", "recipe_old",
        STEP_FIRST),
    Row(RECIPE_TABLE, "ratio 5, generator lr 1e-4, 200 iterations (40 generator updates)", "recipe_ratio5", STEP_FIRST),
    Row(RECIPE_TABLE, "ratio 2, generator lr 1e-4, 200 iterations (100 updates): the recipe", "hiar_fkl", STEP_FIRST),
    Row(RECIPE_TABLE, "the recipe's raw generator (no EMA)", "hiar_fkl", STEP_FIRST, which="generator"),
    Row(LONG_TABLE, "w/o fKL, 600 iterations", "hiar_long", STEP_FIRST),
    Row(NUMERICS_TABLE, "HiAR (fKL), numerics=default (detached cache, exact sigma)", "hiar_fkl", STEP_FIRST),
    Row(NUMERICS_TABLE, "fKL causal, numerics=default", "fkl_causal", STEP_FIRST),
    Row(NUMERICS_TABLE, "fKL causal, numerics=official (+ cache gradient, official sigma grids)", "hiar_fkl_official",
        STEP_FIRST),
    # the network every student starts from, sampled as the rows above: what distillation changed
    Row(BASE_TABLE, "ODE init, step-first t_c = t_{j+1}", ODE_INIT, STEP_FIRST),
    Row(BASE_TABLE, "ODE init, step-first t_c = t_j", ODE_INIT, (*STEP_FIRST, "sampler.context_level=current")),
    Row(BASE_TABLE, "ODE init, step-first t_c = 0", ODE_INIT, (*STEP_FIRST, "sampler.context_level=clean")),
    Row(BASE_TABLE, "ODE init, block-first", ODE_INIT, BLOCK_FIRST),
]


class Budget:
    def __init__(self, minutes: float | None):
        self.deadline = None if minutes is None else time.monotonic() + 60 * minutes

    def left(self) -> bool:
        return self.deadline is None or time.monotonic() < self.deadline


def weights(out: Path, student: str, seed: int, which: str = "auto") -> Path:
    if student == ODE_INIT:
        return out / "artifacts" / "ode_init" / "ode_init.safetensors"
    if which == "generator":  # the raw generator lives only in the training checkpoint
        return out / "runs" / f"{student}_s{seed}" / "checkpoints" / "last.ckpt"
    return out / "artifacts" / f"{student}_s{seed}" / "student.safetensors"


def student_seeds(name: str, seeds: list[int]) -> list[int]:
    return seeds if name in MAIN_STUDENTS else seeds[:1]


def _load_json(path: Path, default):
    return json.loads(path.read_text()) if path.exists() else default


# ----------------------------------------------------------------------------------------------- training


def train(out: Path, seeds: list[int], only: list[str] | None, common: list[str], budget: Budget,
          after_each=None) -> None:
    """The shared ODE pairs and ODE init, then every missing or stale student, seed by seed (all rows get a first seed
    before any gets a second); an interrupted student resumes from its last checkpoint. after_each() runs after every
    student (the `all` command evaluates it at once)."""
    timings: dict[str, float] = {}
    for stage in ("ode_pairs", "ode_init"):
        if stale_reason(stage_config(stage, common)) is not None:
            run(stage, ["-m", "src.train", f"experiment={stage}", *common], timings)
    times_path = out / "student_seconds.json"
    order = [(seed, name) for seed in seeds for name in STUDENTS if name not in LAST_STUDENTS]
    order += [(seeds[0], name) for name in LAST_STUDENTS]
    for seed, name in order:
        student = STUDENTS[name]
        if (only and name not in only) or seed not in student_seeds(name, seeds):
            continue
        run_name = f"{name}_s{seed}"
        overrides = [f"task_name={run_name}", f"seed={seed}", *student.overrides, *common,
                     # dynamics over training: the oracle on 4 prompts x 81 frames every 80 optimizer steps
                     "callbacks=drift", "world.training.drift_every_n_steps=80",
                     # every checkpoint kept: the Fig. 4 probe reads them
                     "callbacks.checkpoint.save_top_k=-1", "callbacks.checkpoint.every_n_iterations=40"]
        reason = stale_reason(stage_config(student.experiment, overrides))
        if reason is None:
            continue
        if not budget.left():
            print(f"=== budget spent: {run_name} not started ({reason})")
            return
        run_dir = out / "runs" / run_name
        last = run_dir / "checkpoints" / "last.ckpt"
        resume = [f"ckpt_path={last}"] if last.exists() else []
        print(f"=== {run_name}: {'resuming' if resume else 'training'} ({reason})")
        run(run_name, ["-m", "src.train", f"experiment={student.experiment}", *overrides, *resume,
                       f"hydra.run.dir={run_dir}"], timings)
        times = _load_json(times_path, {})
        times[run_name] = times.get(run_name, 0) + timings[run_name] if resume else timings[run_name]
        atomic_write_text(times_path, json.dumps(times, indent=1))
        if after_each is not None:
            after_each()


# ----------------------------------------------------------------------------------------------- evaluation


def evaluation_prompts() -> list[str]:
    from src.worlds.toy.shapes import heldout_prompts

    return [p for p in heldout_prompts(EVAL_PROMPTS) for _ in range(EVAL_NOISE_SEEDS)]


def row_pipeline(row: Row, weights_path: Path):
    """The weights loaded for generation, sampled as the row says (its order, then its sampler overrides)."""
    from src.api import HiAR

    return HiAR.from_checkpoint(weights_path, world="toy", sampler=row.sampling[0].split("=", 1)[1], which=row.which,
                                overrides=list(row.sampling[1:]))


def generate_batched(pipe, prompts: list[str], num_frames: int):
    """Videos [N, T, 3, H, W] in [-1, 1], EVAL_BATCH at a time, batch b from NoiseBank(EVAL_SEED + b)."""
    import torch

    from src.sampling.noise import NoiseBank
    from src.sampling.orders import sample

    videos = []
    with torch.no_grad():
        for b, start in enumerate(range(0, len(prompts), EVAL_BATCH)):
            cond, _ = pipe.text_encoder.encode(prompts[start : start + EVAL_BATCH])
            latents = sample(pipe.model, cond, num_frames, pipe.latent_shape, pipe.sampler, NoiseBank(EVAL_SEED + b),
                             order=pipe.order)
            videos.append(pipe.codec.decode(latents).clamp(-1, 1))
    return torch.cat(videos)


def score(videos, prompts: list[str]) -> list[dict]:
    from src.worlds.toy.oracle import score_video

    scores = []
    for video, prompt in zip(videos, prompts):
        s = score_video(video, prompt, segments=5)
        scores.append({"prompt": prompt, **{m: s[m] for m in MEASURES}, "segments": {m: s["segments"][m] for m in CURVES}})
    return scores


def evaluate(out: Path, seeds: list[int], budget: Budget) -> None:
    """Every row x trained seed without a score file: generate, score, write scores/<key>.json."""
    from src.worlds.toy.shapes import parse_prompt, render_video

    prompts = evaluation_prompts()
    scores_dir = out / "scores"
    truth = scores_dir / "ground_truth.json"
    if not truth.exists():
        videos = [render_video(parse_prompt(p), EVAL_FRAMES, 16, 16, seed=i) for i, p in enumerate(prompts)]
        atomic_write_text(truth, json.dumps({"videos": score(videos, prompts), "seconds": 0.0}))
    done: set[str] = set()
    for row in ROWS:
        for seed in student_seeds(row.student, seeds):
            key = row.eval_key(seed)
            path = scores_dir / f"{key}.json"
            student = weights(out, row.student, seed, row.which)
            published = weights(out, row.student, seed)  # a raw generator only once its run has ended
            if key in done or path.exists() or not student.exists() or not published.exists():
                continue
            if not budget.left():
                print(f"=== budget spent: {key} not evaluated")
                return
            pipe = row_pipeline(row, student)
            start = time.perf_counter()
            videos = generate_batched(pipe, prompts, EVAL_FRAMES)
            seconds = time.perf_counter() - start
            atomic_write_text(path, json.dumps({"videos": score(videos, prompts), "seconds": round(seconds, 1),
                                                "student": str(student), "sampling": list(row.sampling)}))
            print(f"=== evaluated {key}: {len(prompts)} videos in {seconds:.0f} s")
            done.add(key)


# ----------------------------------------------------------------------------------------------- Fig. 4 probe


def fig4_probe(out: Path, seeds: list[int], num_videos: int = 16) -> None:
    """One-step predictions (pure noise at t = 1000, all 21 frames at once, as the forward-KL term sees them) of the
    ODE init and every kept checkpoint of the `hiar` and `hiar_long` students (no forward-KL), in bidirectional and in
    block-causal attention; their dynamics = mean absolute luma difference of consecutive frames (VBench's dynamic
    degree is a flow magnitude; the one-step predictions are too blurry for the oracle's object tracker). Writes
    scores/fig4_<run>.json."""
    import hydra
    import torch
    from hydra import compose, initialize_config_dir

    from evaluation.measures import frame_difference
    from src.checkpoints import load_dit
    from src.flow_matching import x0_from_velocity
    from src.worlds.toy.shapes import heldout_prompts

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        world = compose("generate", overrides=["world=toy", "checkpoint=", "prompts=", "output_dir="]).world
    text_encoder, codec = hydra.utils.instantiate(world.text_encoder), hydra.utils.instantiate(world.codec)
    latent_shape = (world.latent.channels, world.latent.height, world.latent.width)
    for run_name in [f"hiar_s{seed}" for seed in seeds] + [f"hiar_long_s{seeds[0]}"]:
        kept = sorted((out / "runs" / run_name / "checkpoints").glob("iteration-*.ckpt"))
        if not kept:
            continue
        # iteration 0: the ODE init every student starts from
        checkpoints = {out / "artifacts" / "ode_init" / "ode_init.safetensors": 0}
        checkpoints.update({c: int(c.stem.split("-")[1]) for c in kept})
        path = out / "scores" / f"fig4_{run_name}.json"
        known = _load_json(path, {"points": []})
        measured = {p["checkpoint"] for p in known["points"]}
        todo = [c for c in checkpoints if c.name not in measured]
        if not todo:
            continue
        cond, _ = text_encoder.encode(heldout_prompts(num_videos))
        noise = torch.randn((num_videos, 21, *latent_shape), generator=torch.Generator().manual_seed(EVAL_SEED))
        t = torch.full((num_videos,), 1000.0)
        for ckpt in todo:
            model = load_dit(ckpt, which="generator" if ckpt.suffix == ".ckpt" else "auto").eval()
            point = {"checkpoint": ckpt.name, "iteration": checkpoints[ckpt]}
            for mode, fpb in (("bidirectional", None), ("causal", int(world.frames_per_block))):
                with torch.no_grad():
                    x0 = x0_from_velocity(noise, model(noise, t, cond, frames_per_block=fpb), t)
                pixels = (codec.decode(x0).clamp(-1, 1) + 1) / 2
                point[mode] = float(torch.stack([frame_difference(v).mean() for v in pixels]).mean())
            known["points"].append(point)
        known["points"].sort(key=lambda p: p["iteration"])
        atomic_write_text(path, json.dumps(known, indent=1))


# ----------------------------------------------------------------------------------------------- block boundaries


BOUNDARY_ROWS = ("t_c = t_j (current)", "t_c = t_{j+1} (HiAR)", "t_c = 0 (clean)", "block-first Self-Forcing",
                 "ODE init, step-first t_c = t_{j+1}", "ODE init, step-first t_c = t_j")


def boundary_measures(video, prompt: str, frames_per_block: int) -> dict:
    """The oracle's per-step direction agreement and displacement, split into steps inside a block and steps from a
    block's last frame to the next block's first (where the context level decides what the new block knows)."""
    from src.worlds.toy.oracle import analyse_frames, step_measures
    from src.worlds.toy.shapes import parse_prompt

    attrs = parse_prompt(prompt)
    steps = step_measures(analyse_frames(video, attrs), attrs)
    across = (np.arange(len(steps["agree"])) + 1) % frames_per_block == 0
    out = {}
    for name, mask in (("within", ~across), ("across", across)):
        moved = steps["displacement"][mask]
        moved = moved[~np.isnan(moved)]
        out[f"direction_{name}"] = float(steps["agree"][mask].mean())
        out[f"step_px_{name}"] = float(moved.mean()) if len(moved) else None  # None: the object was never found
    return out


def boundary_probe(out: Path, seeds: list[int]) -> None:
    """For the context-level rows (first seed): regenerate their evaluation videos (the same noise, so the same
    videos) and measure motion inside blocks vs across block boundaries -> scores/boundaries_<key>.json."""

    prompts = evaluation_prompts()
    for row in [r for r in ROWS if r.name in BOUNDARY_ROWS]:
        key = row.eval_key(seeds[0])
        path = out / "scores" / f"boundaries_{key}.json"
        student = weights(out, row.student, seeds[0])
        if path.exists() or not student.exists():
            continue
        pipe = row_pipeline(row, student)
        fpb = pipe.sampler.frames_per_block
        videos = generate_batched(pipe, prompts, EVAL_FRAMES)
        per_video = [boundary_measures(v, p, fpb) for v, p in zip(videos, prompts)]
        atomic_write_text(path, json.dumps({"row": row.name, "frames_per_block": fpb, "videos": per_video}))
        print(f"=== block boundaries of {key}")


# ----------------------------------------------------------------------------------------------- report


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error (None from a single value: results.json holds no NaN)."""
    values = np.asarray(values, dtype=np.float64)
    se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
    return float(values.mean()), se


def row_statistics(out: Path, row: Row, seeds: list[int]) -> dict | None:
    """Per measure: mean +- SE over training seeds (of each seed's mean over videos); with one seed, over videos."""
    per_seed = []
    for seed in student_seeds(row.student, seeds):
        path = out / "scores" / f"{row.eval_key(seed)}.json"
        if path.exists():
            per_seed.append(json.loads(path.read_text()))
    if not per_seed:
        return None
    stats = {"seeds": len(per_seed), "videos": sum(len(s["videos"]) for s in per_seed),
             "generation_seconds": [s["seconds"] for s in per_seed]}
    for m in MEASURES:
        seed_means = [float(np.mean([v[m] for v in s["videos"]])) for s in per_seed]
        stats[m] = mean_se(seed_means) if len(per_seed) > 1 else mean_se([v[m] for v in per_seed[0]["videos"]])
    stats["fidelity_vs_ode_init"] = paired_with_ode_init(out, row, seeds, per_seed)
    stats["segments"] = {}
    for m in CURVES:
        curves = np.array([np.mean([v["segments"][m] for v in s["videos"]], axis=0) for s in per_seed])
        if len(per_seed) == 1:
            curves = np.array([v["segments"][m] for v in per_seed[0]["videos"]])
        stats["segments"][m] = [mean_se(list(curves[:, i])) for i in range(curves.shape[1])]
    return stats


def paired_with_ode_init(out: Path, row: Row, seeds: list[int], per_seed: list[dict]):
    """20 s fidelity of the row minus that of the ODE init sampled the same way, video by video (same prompts and
    noise): mean +- SE over training seeds of each seed's mean difference (one seed: over its videos); None for the
    ODE init itself or before its score exists."""
    base_row = next((r for r in ROWS if r.student == ODE_INIT and r.sampling == row.sampling), None)
    base_path = out / "scores" / f"{base_row.eval_key(0)}.json" if base_row else None
    if row.student == ODE_INIT or base_path is None or not base_path.exists():
        return None
    base = [v["fidelity"] for v in json.loads(base_path.read_text())["videos"]]
    diffs = [np.asarray([v["fidelity"] for v in s["videos"]]) - base for s in per_seed]
    return mean_se([float(d.mean()) for d in diffs]) if len(diffs) > 1 else mean_se(list(diffs[0]))


def _cell(pair, one_seed: bool) -> str:
    mean, se = pair
    return f"{mean:.3f} ± {se:.3f}{'*' if one_seed else ''}" if se is not None else f"{mean:.3f}"


def training_curves(out: Path) -> dict[str, dict[str, list]]:
    """Per student run: the generator loss and the drift callback's oracle numbers over optimizer steps."""
    curves: dict[str, dict[str, list]] = {}
    for metrics in sorted((out / "runs").glob("*/csv/version_*/metrics.csv")):  # a resumed run adds a version
        series = curves.setdefault(metrics.relative_to(out / "runs").parts[0], {})
        with metrics.open() as f:
            for record in csv.DictReader(f):
                for key in ("train/dmd", "train/fkl", "train/critic", "drift/oracle_motion", "drift/oracle_fidelity"):
                    if record.get(key) and math.isfinite(float(record[key])):  # a skipped non-finite step: no point
                        series.setdefault(key, []).append((int(record["step"]), float(record[key])))
    return curves


def plot(results: dict, fig4: dict, curves: dict, plots: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    written = []
    for table in dict.fromkeys(r.table for r in ROWS):
        rows = {name: s for name, s in results["rows"].items() if s and s["table"] == table}
        if not rows:
            continue
        fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
        for ax, m in zip(axes.flat, CURVES):
            for name, s in [("ground truth", results["ground_truth"]), *rows.items()]:
                mean = [p[0] for p in s["segments"][m]]
                se = [p[1] or 0 for p in s["segments"][m]]
                ax.errorbar(np.arange(1, len(mean) + 1) * 4 - 2, mean, yerr=se, marker="o", capsize=2, label=name,
                            linestyle="--" if name == "ground truth" else "-")
            ax.set_title(m)
            ax.set_xlabel("time in the 20 s video (s)")
            ax.grid(alpha=0.3)
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(f"{table}: oracle per 4 s segment (mean ± SE)")
        fig.tight_layout()
        name = PLOTS[table]
        fig.savefig(plots / name, dpi=110)
        plt.close(fig)
        written.append(name)
    if fig4:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for run_name, points in fig4.items():
            steps = [p["iteration"] for p in points["points"]]
            for mode in ("bidirectional", "causal"):
                ax.plot(steps, [p[mode] for p in points["points"]], marker="o", label=f"{run_name} {mode}")
        ax.set_xlabel("training iteration (w/o forward-KL)")
        ax.set_ylabel("one-step dynamics (frame diff)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plots / "fig4_dynamics.png", dpi=110)
        plt.close(fig)
        written.append("fig4_dynamics.png")
    if curves:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
        for run_name, series in curves.items():
            for ax, key in zip(axes, ("train/dmd", "drift/oracle_motion")):
                if key in series:
                    ax.plot(*zip(*series[key]), label=run_name, marker="o" if key.startswith("drift") else None)
        for ax, key in zip(axes, ("DMD loss (generator)", "oracle speed of 4 drift-callback videos (px/frame)")):
            ax.set_title(key)
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(plots / "training_curves.png", dpi=110)
        plt.close(fig)
        written.append("training_curves.png")
    return written


def weight_change(out: Path) -> dict[str, float]:
    """Per published student: ||w - w_ode_init|| / ||w_ode_init|| over all weights (how far distillation moved it)."""
    from safetensors.torch import load_file

    base_path = out / "artifacts" / "ode_init" / "ode_init.safetensors"
    if not base_path.exists():
        return {}
    base = load_file(base_path)
    norm = math.sqrt(sum(float(v.double().square().sum()) for v in base.values()))
    change = {}
    for path in sorted((out / "artifacts").glob("*_s*/student.safetensors")):
        student = load_file(path)
        change[path.parent.name] = math.sqrt(sum(float((student[k].double() - v.double()).square().sum())
                                                 for k, v in base.items())) / norm
    return change


def sync_scores(out: Path, dest: Path) -> None:
    """Each score file missing on one side (the work folder's scores/ or the kept copies in dest/scores/) is copied
    from the other."""
    work, kept = out / "scores", dest / "scores"
    for a, b in ((work, kept), (kept, work)):
        for path in sorted(a.glob("*.json")) if a.exists() else []:
            if not (b / path.name).exists():
                b.mkdir(parents=True, exist_ok=True)
                atomic_write_text(b / path.name, path.read_text())


def report(out: Path, seeds: list[int], dest: Path = HERE) -> dict:
    """results.json, results.md and plots/ in `dest` from every score file under `out` (synced with dest/scores).
    Whatever this run cannot measure (a row without score files, the curves and weights of students no longer under
    `out`) is kept from the previous results.json; such rows say `"carried_over": true`."""
    sync_scores(out, dest)
    previous = _load_json(dest / "results.json", {})
    truth = _load_json(out / "scores" / "ground_truth.json", None)
    results = {"seeds": seeds, "rows": {}, "student_seconds": _load_json(out / "student_seconds.json", {})}
    if truth is not None:
        results["ground_truth"] = {
            **{m: mean_se([v[m] for v in truth["videos"]]) for m in MEASURES},
            "segments": {m: [mean_se([v["segments"][m][i] for v in truth["videos"]]) for i in range(5)] for m in CURVES},
        }
    for row in ROWS:
        stats = row_statistics(out, row, seeds)
        old = previous.get("rows", {}).get(row.name)
        results["rows"][row.name] = (
            {**stats, "table": row.table, "student": row.student, "sampling": list(row.sampling)} if stats
            else {**old, "carried_over": True} if old else None)
    results["student_seconds"] = dict(sorted({**previous.get("student_seconds", {}), **results["student_seconds"]}.items()))
    fig4 = {p.stem.removeprefix("fig4_"): json.loads(p.read_text()) for p in sorted((out / "scores").glob("fig4_*.json"))}
    for points in fig4.values():
        bi = [p["bidirectional"] for p in points["points"]]
        causal = [p["causal"] for p in points["points"]]
        points["pearson_r"] = float(np.corrcoef(bi, causal)[0, 1]) if len(bi) > 2 else None
    results["fig4"] = fig4 = {**previous.get("fig4", {}), **fig4}
    results["weight_change_from_ode_init"] = dict(sorted(
        {**previous.get("weight_change_from_ode_init", {}), **weight_change(out)}.items()))
    results["block_boundaries"] = dict(previous.get("block_boundaries", {}))
    for p in sorted((out / "scores").glob("boundaries_*.json")):
        probe = json.loads(p.read_text())
        results["block_boundaries"][probe["row"]] = {
            m: mean_se([v[m] for v in probe["videos"] if v[m] is not None]) for m in probe["videos"][0]}
    results["training_curves"] = curves = {**previous.get("training_curves", {}), **training_curves(out)}
    results["plots"] = plot(results, fig4, curves, dest / "plots") if truth is not None else []
    atomic_write_text(dest / "results.json", json.dumps(results, indent=1, allow_nan=False))
    atomic_write_text(dest / "results.md", markdown(results))
    return results


def markdown(results: dict) -> str:
    columns = [("fidelity", "fidelity"), ("direction_agreement", "direction"), ("object_found", "found"),
               ("object_color_error", "colour err"), ("shape_agreement", "shape"), ("speckle", "speckle"),
               ("motion", "speed px/frame")]
    lines = []
    for table in dict.fromkeys(r.table for r in ROWS):
        lines += [f"## {table}", "", "| row | seeds | videos | " + " | ".join(t for _, t in columns)
                  + " | fidelity, last 4 s | Δ fidelity vs ODE init | student |", "|" + "---|" * (len(columns) + 6)]
        for row in [r for r in ROWS if r.table == table]:
            s = results["rows"].get(row.name)
            if not s:
                lines.append(f"| {row.name} | 0 | 0 | " + " | ".join("not run" for _ in columns) + f" | | | {row.student} |")
                continue
            one = s["seeds"] == 1
            cells = [_cell(s[m], one) for m, _ in columns]
            carried = " †" if s.get("carried_over") else ""
            lines.append(f"| {row.name}{carried} | {s['seeds']} | {s['videos']} | " + " | ".join(cells)
                         + f" | {_cell(s['segments']['fidelity'][-1], one)} | "
                         + (_cell(s["fidelity_vs_ode_init"], one) if s["fidelity_vs_ode_init"] else "")
                         + f" | {row.student} |")
        lines.append("")
    if results.get("ground_truth"):
        g = results["ground_truth"]
        lines += ["Ground truth (same prompts): " + ", ".join(f"{t} {g[m][0]:.3f}" for m, t in columns), ""]
    lines += [f"\\* one training seed: the standard error is over its {EVAL_PROMPTS * EVAL_NOISE_SEEDS} videos, not over"
              " seeds. Δ fidelity: the row minus the ODE init sampled the same way, paired over the same videos.", ""]
    if any(s and s.get("carried_over") for s in results["rows"].values()):
        lines += ["† carried over from the previous results.json: measured by an earlier run of this script whose "
                  "per-video score files were not kept (scores/ holds those of every later run).", ""]
    if results["fig4"]:
        lines += ["## Fig. 4 analogue: one-step dynamics over training without forward-KL", "",
                  "| run | checkpoints | bidirectional first -> last | causal first -> last | Pearson r |",
                  "|---|---|---|---|---|"]
        for run_name, points in results["fig4"].items():
            p = points["points"]
            r = points["pearson_r"]
            lines.append(f"| {run_name} | {len(p)} | {p[0]['bidirectional']:.4f} -> {p[-1]['bidirectional']:.4f} | "
                         f"{p[0]['causal']:.4f} -> {p[-1]['causal']:.4f} | {'n/a' if r is None else f'{r:.3f}'} |")
        lines.append("")
    if results.get("weight_change_from_ode_init"):
        lines += ["## How far distillation moved each student: ||w - w_ODE init|| / ||w_ODE init||", "",
                  "| run | relative change |", "|---|---|"]
        lines += [f"| {k} | {v:.5f} |" for k, v in results["weight_change_from_ode_init"].items()] + [""]
    if results.get("block_boundaries"):
        videos = EVAL_PROMPTS * EVAL_NOISE_SEEDS
        lines += [f"## Motion inside blocks vs across block boundaries (first seed, {videos} videos, mean ± SE over videos)",
                  "", "| row | direction inside | direction across | px/frame inside | px/frame across |",
                  "|---|---|---|---|---|"]
        for name, b in results["block_boundaries"].items():
            lines.append(f"| {name} | " + " | ".join(_cell(b[m], False) for m in (
                "direction_within", "direction_across", "step_px_within", "step_px_across")) + " |")
        lines.append("")
    if results["student_seconds"]:
        lines += ["## Time per student (2 CPU cores, training incl. the drift callback)", "",
                  "| run | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in results["student_seconds"].items()] + [""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("all", "train", "evaluate", "fig4", "boundaries", "report"), nargs="?",
                        default="all")
    parser.add_argument("--out", default="outputs/toy_ablation")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of the main rows")
    parser.add_argument("--only", nargs="+", choices=list(STUDENTS), help="train only these students")
    parser.add_argument("--budget-min", type=float, default=None, help="start no new work after this many minutes")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every training stage")
    args = parser.parse_intermixed_args(argv)
    out = (ROOT / args.out).resolve()
    common = [f"paths.artifacts_dir={out / 'artifacts'}", f"paths.log_dir={out / 'logs'}", *args.overrides]
    budget = Budget(args.budget_min)
    sync_scores(out, HERE)  # the kept scores: nothing evaluated before is evaluated again
    if args.command in ("all", "train"):
        after_each = (lambda: evaluate(out, args.seeds, Budget(None))) if args.command == "all" else None
        train(out, args.seeds, args.only, common, budget, after_each)
    if args.command in ("all", "evaluate"):
        evaluate(out, args.seeds, budget)
    if args.command in ("all", "fig4"):
        fig4_probe(out, args.seeds)
    if args.command in ("all", "boundaries"):
        boundary_probe(out, args.seeds)
    print(markdown(report(out, args.seeds)))


if __name__ == "__main__":
    main()
