"""`make demo`: the whole toy-world chain on 2 CPU cores, through the same commands a user runs.

    teacher (shipped in assets/, else trained) -> ODE pairs -> ODE init -> hiar_fkl (DMD + step-first + forward-KL)
    -> 20 s step-first generations of the ODE init and the distilled student for the same held-out prompts and noise
    -> oracle / drift report, with the paired difference student minus ODE init (what distillation bought)

Each stage is its own `python -m ...` process with Hydra overrides, so the demo exercises exactly the CLI. A stage is
rebuilt exactly when its published output is missing or its manifest disagrees with what the stage would make now
(its settings, its input weights, or an upstream stage that was rebuilt; src/artifacts.py). It ends by printing the
paths of the videos and the report, and the seconds each stage took.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from src.artifacts import stale_reason
from src.io import atomic_write_text
from src.training.teacher import export_teacher

ROOT = Path(__file__).resolve().parents[1]
# The toy world's defaults are the demo's sizes (within 10 minutes on 2 CPU cores); overrides given on the command line
# apply to every stage.
STAGES = ["ode_pairs", "ode_init", "hiar_fkl"]


def run(stage: str, args: list[str], timings: dict) -> None:
    print(f"\n=== {stage}: python {' '.join(args)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=ROOT)
    if done.returncode:  # the stage printed its own error above (a refusal: one line)
        raise SystemExit(f"error: the demo stopped: stage {stage} exited with status {done.returncode}")
    timings[stage] = round(time.perf_counter() - start, 1)
    print(f"=== {stage} done in {timings[stage]} s", flush=True)


def stage_config(stage: str, overrides: list[str]) -> DictConfig:
    """The config `python -m src.train experiment=<stage> <overrides>` would run with."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"experiment={stage}", *overrides])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="where the artifacts, videos and report go")
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts to generate 20 s videos for")
    parser.add_argument("--fresh", action="store_true", help="recompute every stage (default: reuse current ones)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every stage")
    args = parser.parse_args(argv)

    out = (ROOT / args.out).resolve()
    artifacts = out / "artifacts"
    common = [f"paths.artifacts_dir={artifacts}", f"paths.log_dir={out / 'logs'}", *args.overrides]
    timings: dict[str, float] = {}
    given = [o.split("=", 1)[1] for o in args.overrides if o.startswith("world.teacher_checkpoint=")]
    teacher = Path(given[-1]) if given else ROOT / "assets" / "toy_teacher.safetensors"
    if not teacher.exists():
        print(f"{teacher} is missing: training the toy teacher first (see experiments/teacher_toy/README.md)")
        run("teacher", ["-m", "src.train", "experiment=teacher_toy", *common], timings)
        checkpoints = sorted((out / "logs" / "teacher_toy" / "runs").glob("*/checkpoints/last.ckpt"))
        export_teacher(checkpoints[-1], teacher)  # the newest run's EMA weights

    if args.fresh:
        print(f"recomputing every stage: clearing {artifacts}")
        shutil.rmtree(artifacts, ignore_errors=True)
    for stage in STAGES:  # in order: a rebuilt stage makes the ones after it stale
        reason = stale_reason(stage_config(stage, common))
        if reason is None:
            print(f"=== {stage}: up to date ({artifacts / stage})")
        else:
            print(f"=== {stage}: rebuilding ({reason})")
            run(stage, ["-m", "src.train", f"experiment={stage}", *common], timings)
    models = {"ode_init": artifacts / "ode_init" / "ode_init.safetensors",
              STAGES[-1]: artifacts / STAGES[-1] / "student.safetensors"}

    report_dir = out / "report"
    methods = ", ".join(f"{name}: {{checkpoint: '{path}'}}" for name, path in models.items())
    run("generate_and_report", [
        "-m", "evaluation.run", f"out_dir={report_dir}", f"paths.log_dir={out / 'logs'}",
        f"generate.methods={{{methods}}}", "generate.num_frames=81", f"compare=[[ode_init, {STAGES[-1]}]]",
        f"reference.prompts={args.prompts}",
        *[o for o in args.overrides if o.startswith("world.")],  # the rest (trainer.*, ...) concern training only
    ], timings)

    report = json.loads((report_dir / "report.json").read_text())
    summary = {"seconds": timings, "videos": str(report_dir / "videos"), "report": str(report_dir / "report.md"),
               "student": str(models[STAGES[-1]]), "artifacts": str(artifacts),
               "oracle_per_segment": oracle_per_segment(report), "comparison": report["comparisons"][0]}
    atomic_write_text(out / "demo_summary.json", json.dumps(summary, indent=2))
    print("\n=== demo finished")
    for key, value in summary.items():
        if key not in ("oracle_per_segment", "comparison"):
            print(f"{key}: {value}")
    print(f"oracle per 4 s segment of the 20 s videos ({args.prompts} held-out prompts, the same noise for each model;"
          " mean ± standard error over videos):")
    for method, measures in summary["oracle_per_segment"].items():
        for name, (means, errors) in measures.items():
            print(f"  {method:>14} {name:<20} " + " ".join(f"{m:.2f}±{e:.2f}" for m, e in zip(means, errors)))
    comparison = summary["comparison"]
    print(f"{comparison['method']} minus {comparison['baseline']} (paired over {comparison['videos']} videos):")
    for name, d in comparison["measures"].items():
        print(f"  {name:<20} whole video {d['video']['mean']:+.3f}±{d['video']['se']:.3f}   per segment "
              + " ".join(f"{m:+.2f}±{e:.2f}" for m, e in zip(d["per_segment"]["mean"], d["per_segment"]["se"])))
    return summary


def oracle_per_segment(report: dict, measures=("fidelity", "direction_agreement", "motion")) -> dict:
    """{method: {measure: (per-segment means, their standard errors)}} of the report's toy-world oracle."""
    return {method: {m: (r["summary"]["oracle"]["segments"][m], r["summary"]["oracle"]["segments_se"][m])
                     for m in measures}
            for method, r in report["methods"].items() if r["summary"].get("oracle")}


if __name__ == "__main__":
    main()
