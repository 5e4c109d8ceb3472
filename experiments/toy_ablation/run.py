"""The toy-world ablation of issue 5: self_forcing vs hiar vs hiar_fkl, and the Self-Forcing student sampled
step-first without retraining; 81-frame (20 s) generations for held-out prompts, scored by the oracle.

    .venv/bin/python experiments/toy_ablation/run.py            # writes experiments/toy_ablation/results.{json,md}

All students share one set of ODE pairs and one ODE init (as in the paper), then differ only by their experiment
config. Evaluation is `python -m evaluation.run` over the four methods plus the procedural ground truth.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from src.demo import run  # noqa: E402  (one stage runner for the demo and this study)

HERE = Path(__file__).resolve().parent
STUDENTS = ("self_forcing", "hiar", "hiar_fkl")
# method name -> (trained experiment, sampler order at inference)
METHODS = {
    "self_forcing": ("self_forcing", "block_first"),
    "self_forcing_step_first": ("self_forcing", "step_first"),
    "hiar": ("hiar", "step_first"),
    "hiar_fkl": ("hiar_fkl", "step_first"),
}
COLUMNS = [("fidelity", "fidelity"), ("direction_agreement", "direction"), ("object_found", "object found"),
           ("object_color_error", "object colour err"), ("motion", "motion px/frame"),
           ("found_slope", "object found: slope"), ("found_first_last", "object found: last-first"),
           ("motion_slope", "motion: slope"), ("hiar_drift", "HiAR drift (sat., sharpness)")]
SEGMENT_MEASURES = ("fidelity", "direction_agreement", "motion")


def table(report: dict) -> tuple[list[dict], str]:
    """One row per method from evaluation.run's report.json: oracle means and the drift over 5 segments."""
    rows = []
    for method, result in report["methods"].items():
        summary = result["summary"]
        oracle = summary.get("oracle") or {}
        drift = oracle.get("drift", {})
        rows.append({
            "method": method,
            "videos": oracle.get("num_videos"),
            **{key: oracle.get(key) for key in ("fidelity", "direction_agreement", "object_found", "object_color_error",
                                                 "motion")},
            "found_slope": drift.get("object_found", {}).get("slope"),
            "found_first_last": drift.get("object_found", {}).get("first_last"),
            "motion_slope": drift.get("motion", {}).get("slope"),
            "hiar_drift": summary.get("drift"),
            "segments": {m: oracle.get("segments", {}).get(m) for m in SEGMENT_MEASURES},
        })
    lines = ["| method | videos | " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 2)]
    for r in rows:
        lines.append("| " + " | ".join([r["method"], str(r["videos"])] + [_fmt(r[key]) for key, _ in COLUMNS]) + " |")
    return rows, "\n".join(lines)


def segment_table(rows: list[dict]) -> str:
    """Per 4 s segment of the 20 s videos: the oracle's fidelity, direction agreement and motion."""
    lines = ["| method | " + " | ".join(f"{m} per segment" for m in SEGMENT_MEASURES) + " |",
             "|" + "---|" * (len(SEGMENT_MEASURES) + 1)]
    for r in rows:
        cells = [" ".join(f"{v:.2f}" for v in r["segments"][m]) if r["segments"][m] else "n/a" for m in SEGMENT_MEASURES]
        lines.append("| " + " | ".join([r["method"], *cells]) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/toy_ablation")
    parser.add_argument("--prompts", type=int, default=32, help="held-out prompts (one 81-frame video each)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the training stages")
    args = parser.parse_args(argv)
    out = (ROOT / args.out).resolve()
    artifacts = out / "artifacts"
    common = [f"paths.artifacts_dir={artifacts}", f"paths.log_dir={out / 'logs'}", *args.overrides]
    timings: dict[str, float] = {}
    if not any((artifacts / "ode_pairs").glob("ode-*.tar")):
        run("ode_pairs", ["-m", "src.train", "experiment=ode_pairs", *common], timings)
    if not (artifacts / "ode_init" / "ode_init.safetensors").exists():
        run("ode_init", ["-m", "src.train", "experiment=ode_init", *common], timings)
    for student in STUDENTS:
        if not (artifacts / student / "student.safetensors").exists():
            run(student, ["-m", "src.train", f"experiment={student}", *common], timings)

    methods = ", ".join(
        f"{name}: {{checkpoint: '{artifacts / trained / 'student.safetensors'}', overrides: ['sampler={order}']}}"
        for name, (trained, order) in METHODS.items()
    )
    report_dir = out / "report"
    if not (report_dir / "report.json").exists():
        run("evaluate", ["-m", "evaluation.run", f"out_dir={report_dir}", f"paths.log_dir={out / 'logs'}",
                         f"generate.methods={{{methods}}}", "generate.num_frames=81",
                         f"reference.prompts={args.prompts}", *[o for o in args.overrides if o.startswith("world.")]],
            timings)

    report = json.loads((report_dir / "report.json").read_text())
    rows, markdown = table(report)
    markdown += "\n\n" + segment_table(rows)
    previous = json.loads((HERE / "results.json").read_text()) if (HERE / "results.json").exists() else {}
    timings = {**previous.get("seconds", {}), **timings}  # a rerun that only re-tables keeps the stages' times
    (HERE / "results.json").write_text(json.dumps({"rows": rows, "seconds": timings, "prompts": args.prompts,
                                                   "overrides": args.overrides}, indent=2))
    (HERE / "results.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
