"""`make demo`: the whole toy-world chain on 2 CPU cores, through the same commands a user runs.

    teacher (shipped in assets/, else trained) -> ODE pairs -> ODE init -> hiar_fkl (DMD + step-first + forward-KL)
    -> 20 s step-first generations for held-out prompts -> oracle / drift report

Each stage is its own `python -m ...` process with Hydra overrides, so the demo exercises exactly the CLI. It ends by
printing the paths of the videos and the report, and the seconds each stage took.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from src.training.teacher import export_teacher

ROOT = Path(__file__).resolve().parents[1]
# Stage sizes that keep the chain within ~10 minutes on 2 CPU cores (the world's defaults are the ablation's sizes);
# overrides given on the command line come later and win.
DEMO_SIZES = ["world.training.num_ode_pairs=64", "world.training.ode_init_steps=200",
              "world.training.distill_steps=180"]


def run(stage: str, args: list[str], timings: dict) -> None:
    print(f"\n=== {stage}: python {' '.join(args)}", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)
    timings[stage] = round(time.perf_counter() - start, 1)
    print(f"=== {stage} done in {timings[stage]} s", flush=True)


def stale_artifacts(artifacts: Path, teacher: Path) -> bool:
    """True if artifacts exist that another teacher made (artifacts/teacher.sha256 records the one that made them)."""
    stamp = artifacts / "teacher.sha256"
    if not artifacts.exists() or not any(artifacts.iterdir()):
        return False
    return not stamp.exists() or stamp.read_text().strip() != hashlib.sha256(teacher.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="where the artifacts, videos and report go")
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts to generate 20 s videos for")
    parser.add_argument("--fresh", action="store_true", help="recompute every stage (default: reuse finished ones)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every stage")
    args = parser.parse_args(argv)

    out = (ROOT / args.out).resolve()
    artifacts = out / "artifacts"
    common = [f"paths.artifacts_dir={artifacts}", f"paths.log_dir={out / 'logs'}", *DEMO_SIZES, *args.overrides]
    timings: dict[str, float] = {}
    given = [o.split("=", 1)[1] for o in args.overrides if o.startswith("world.teacher_checkpoint=")]
    teacher = Path(given[-1]) if given else ROOT / "assets" / "toy_teacher.safetensors"
    if not teacher.exists():
        print(f"{teacher} is missing: training the toy teacher first (see experiments/teacher_toy/README.md)")
        run("teacher", ["-m", "src.train", "experiment=teacher_toy", *common], timings)
        checkpoints = sorted((out / "logs" / "teacher_toy" / "runs").glob("*/checkpoints/last.ckpt"))
        export_teacher(checkpoints[-1], teacher)  # the newest run's EMA weights

    if args.fresh or stale_artifacts(artifacts, teacher):
        print(f"recomputing every stage: clearing {artifacts}" + ("" if args.fresh else " (made with another teacher)"))
        shutil.rmtree(artifacts, ignore_errors=True)  # the ODE-pair stage resumes from existing shards otherwise
        args.fresh = True
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "teacher.sha256").write_text(hashlib.sha256(teacher.read_bytes()).hexdigest())
    if args.fresh or not any((artifacts / "ode_pairs").glob("ode-*.tar")):
        run("ode_pairs", ["-m", "src.train", "experiment=ode_pairs", *common], timings)
    if args.fresh or not (artifacts / "ode_init.safetensors").exists():
        run("ode_init", ["-m", "src.train", "experiment=ode_init", *common], timings)
    student = artifacts / "hiar_fkl" / "student.safetensors"
    if args.fresh or not student.exists():
        run("hiar_fkl", ["-m", "src.train", "experiment=hiar_fkl", *common], timings)

    report_dir = out / "report"
    run("generate_and_report", [
        "-m", "evaluation.run", f"out_dir={report_dir}", f"paths.log_dir={out / 'logs'}",
        f"generate.methods={{hiar_fkl: {{checkpoint: '{student}'}}}}", "generate.num_frames=81",
        f"reference.prompts={args.prompts}",
        *[o for o in args.overrides if o.startswith("world.")],  # the rest (trainer.*, ...) concern training only
    ], timings)

    summary = {"seconds": timings, "videos": str(report_dir / "videos"), "report": str(report_dir / "report.md"),
               "student": str(student), "artifacts": str(artifacts)}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print("\n=== demo finished")
    for key, value in summary.items():
        print(f"{key}: {value}")
    return summary


if __name__ == "__main__":
    main()
