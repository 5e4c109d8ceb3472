"""src.demo rebuilds exactly the stages whose inputs changed (and those downstream of them), nothing else."""

import json
import os

import src.demo as demo
from src import artifacts


def test_demo_rebuilds_exactly_the_changed_stages(tmp_path, monkeypatch):
    ran: list[str] = []
    builds = iter(range(100))

    def fake_run(stage, args, timings):
        """Stands in for a stage's process: publishes an export with the manifest that stage would write."""
        ran.append(stage)
        if stage == "generate_and_report":  # the report's oracle part, which the demo prints per segment
            assert "compare=[[ode_init, hiar_fkl]]" in args and "reference.prompts=16" in args
            assert "ode_init: {checkpoint:" in next(a for a in args if a.startswith("generate.methods="))
            measures = ("fidelity", "direction_agreement", "motion")
            oracle = {"segments": {m: [1.0, 0.5] for m in measures}, "segments_se": {m: [0.1, 0.2] for m in measures}}
            difference = {"per_segment": {"mean": [0.25, 0.5], "se": [0.1, 0.1]}, "video": {"mean": 0.375, "se": 0.1}}
            report = tmp_path / "demo/report/report.json"
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(json.dumps({
                "methods": {m: {"summary": {"oracle": oracle}} for m in ("ode_init", "hiar_fkl")},
                "comparisons": [{"baseline": "ode_init", "method": "hiar_fkl", "videos": 16,
                                 "measures": {m: difference for m in measures}}]}))
        if stage not in demo.STAGES:
            return
        run_dir = tmp_path / "runs" / str(next(builds))
        cfg = demo.stage_config(stage, [*args[3:], f"paths.output_dir={run_dir}"])
        export = run_dir / "export"
        export.mkdir(parents=True)
        (export / "weights.bin").write_bytes(os.urandom(8))
        published = tmp_path / "demo/artifacts"
        used = {n: artifacts.read_manifest(published / n) for n in artifacts.stage_of(cfg).inputs}
        artifacts.write_manifest(export, cfg, artifacts.stage_of(cfg), used)
        artifacts.publish(export, published, stage)

    monkeypatch.setattr(demo, "run", fake_run)
    out = str(tmp_path / "demo")
    summary = demo.main(["--out", out])
    assert ran == ["ode_pairs", "ode_init", "hiar_fkl", "generate_and_report"]
    assert summary["oracle_per_segment"]["hiar_fkl"]["fidelity"] == ([1.0, 0.5], [0.1, 0.2])
    assert summary["comparison"]["measures"]["fidelity"]["video"]["mean"] == 0.375
    ran.clear()
    demo.main(["--out", out])
    assert ran == ["generate_and_report"]
    ran.clear()
    demo.main(["--out", out, "world.training.distill_steps=5"])
    assert ran == ["hiar_fkl", "generate_and_report"]
    ran.clear()
    demo.main(["--out", out, "world.training.distill_steps=5", "ode_pairs.guidance=3.0"])
    assert ran == ["ode_pairs", "ode_init", "hiar_fkl", "generate_and_report"]
