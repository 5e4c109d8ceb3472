"""experiments/toy_ablation/run.py: every row composes into the config it claims, and the report's statistics."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

import experiments.toy_ablation.run as ablation

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", list(ablation.STUDENTS))
def test_each_student_trains_with_its_settings(name):
    student = ablation.STUDENTS[name]
    cfg = ablation.stage_config(student.experiment, [f"task_name={name}_s0", *student.overrides])
    expected = {"self_forcing": ("block_first", "next", 0.0, "bidirectional", 1),
                "hiar": ("step_first", "next", 0.0, "bidirectional", 1),
                "hiar_fkl": ("step_first", "next", 0.1, "bidirectional", 1),
                "tc_current": ("step_first", "current", 0.1, "bidirectional", 1),
                "tc_clean": ("step_first", "clean", 0.1, "bidirectional", 1),
                "fkl_causal": ("step_first", "next", 0.1, "causal", 1),
                "fkl_2steps": ("step_first", "next", 0.1, "bidirectional", 2),
                "recipe_old": ("step_first", "next", 0.1, "bidirectional", 1),
                "recipe_ratio5": ("step_first", "next", 0.1, "bidirectional", 1),
                "hiar_long": ("step_first", "next", 0.0, "bidirectional", 1),
                "hiar_fkl_official": ("step_first", "next", 0.1, "causal", 1)}[name]  # the released code's fKL
    got = (cfg.sampler.order, cfg.sampler.context_level, cfg.fkl.weight, cfg.fkl.attention, cfg.fkl.num_steps)
    assert got == expected and cfg.task_name == f"{name}_s0"
    # (optimizer steps, generator update ratio, generator lr): the recipe unless the row is a point of its sweep
    recipe = {"recipe_old": (156, 5, 2e-5), "recipe_ratio5": (240, 5, 1e-4), "hiar_long": (900, 2, 1e-4)}
    got = (cfg.trainer.max_steps, cfg.task.gen_update_ratio, cfg.task.optim.lr_generator)
    assert got == recipe.get(name, (300, 2, 1e-4))
    official = (cfg.task.cache_gradient, cfg.task.dmd.sigma_lookup) == ("official", "official_grid")
    assert official == (name == "hiar_fkl_official")


@pytest.mark.parametrize("row", ablation.ROWS, ids=lambda r: r.name)
def test_each_row_samples_as_its_student_was_trained(row):
    order = row.sampling[0].split("=", 1)[1]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        sampling = compose("generate", overrides=["checkpoint=x", "prompts=x", f"sampler={order}", *row.sampling[1:]])
    if row.student == ablation.ODE_INIT:  # no training config: the ODE init sampled as the students are
        assert row.eval_key(0).startswith("ode_init_s0__") and ablation.weights(Path("o"), row.student, 0).name == \
            "ode_init.safetensors"
        return
    student = ablation.STUDENTS[row.student]
    trained = ablation.stage_config(student.experiment, list(student.overrides))
    assert sampling.sampler.context_level == trained.sampler.context_level
    if "no retraining" not in row.name:
        assert sampling.sampler.order == trained.sampler.order


def _scores(fidelities, segments=5):
    return {"videos": [{"prompt": "p", **{m: f for m in ablation.MEASURES},
                        "segments": {m: [f] * segments for m in ablation.CURVES}} for f in fidelities], "seconds": 1.0}


def test_report_cells_are_means_and_standard_errors_over_seeds(tmp_path):
    out, scores = tmp_path / "out", tmp_path / "out" / "scores"
    scores.mkdir(parents=True)
    (scores / "ground_truth.json").write_text(json.dumps(_scores([1.0, 1.0])))
    hiar_fkl = next(r for r in ablation.ROWS if r.student == "hiar_fkl")
    for seed, values in zip([0, 1, 2], ([1, 0], [1, 1], [0, 0])):  # per-seed means 0.5, 1.0, 0.0
        (scores / f"{hiar_fkl.eval_key(seed)}.json").write_text(json.dumps(_scores(values)))
    base = next(r for r in ablation.ROWS if r.student == ablation.ODE_INIT and r.sampling == hiar_fkl.sampling)
    (scores / f"{base.eval_key(0)}.json").write_text(json.dumps(_scores([0, 0])))
    clean = next(r for r in ablation.ROWS if r.student == "tc_clean")
    (scores / f"{clean.eval_key(0)}.json").write_text(json.dumps(_scores([1, 0, 0, 0])))
    (scores / "fig4_hiar_s0.json").write_text(json.dumps({"points": [
        {"checkpoint": f"iteration-{i:06d}.ckpt", "iteration": i, "bidirectional": b, "causal": c}
        for i, b, c in [(40, 0.3, 0.25), (80, 0.2, 0.18), (120, 0.1, 0.11)]]}))
    boundary = {"direction_within": 1.0, "direction_across": 0.5, "step_px_within": 0.4, "step_px_across": None}
    (scores / "boundaries_tc.json").write_text(json.dumps({"row": "t_c = t_j (current)", "frames_per_block": 3,
                                                           "videos": [boundary, {**boundary, "direction_across": 0.0,
                                                                                 "step_px_across": 1.0}]}))

    import torch
    from safetensors.torch import save_file

    for name, weights in (("ode_init/ode_init", [3.0, 4.0]), ("hiar_s0/student", [3.0, 4.5])):
        (out / "artifacts" / name).parent.mkdir(parents=True)
        save_file({"w": torch.tensor(weights)}, out / "artifacts" / f"{name}.safetensors")

    results = ablation.report(out, [0, 1, 2], dest=tmp_path / "dest")
    assert results["weight_change_from_ode_init"] == {"hiar_s0": pytest.approx(0.5 / 5.0)}
    boundaries = results["block_boundaries"]["t_c = t_j (current)"]
    assert boundaries["direction_across"][0] == pytest.approx(0.25)  # mean over videos
    assert boundaries["step_px_across"][0] == 1.0 and boundaries["step_px_across"][1] is None  # one video
    row = results["rows"][hiar_fkl.name]
    assert row["seeds"] == 3 and row["videos"] == 6
    assert row["fidelity"][0] == pytest.approx(0.5) and row["fidelity"][1] == pytest.approx(0.5 / math.sqrt(3))
    # paired with the ODE init video by video: per-seed mean differences 0.5, 1.0, 0.0 (as the fidelities)
    assert row["fidelity_vs_ode_init"] == pytest.approx((0.5, 0.5 / math.sqrt(3)))
    assert results["rows"][base.name]["fidelity_vs_ode_init"] is None
    assert results["rows"][clean.name]["fidelity_vs_ode_init"] is None  # its ODE init row (t_c = 0) was not scored
    one_seed = results["rows"][clean.name]
    assert one_seed["seeds"] == 1 and one_seed["fidelity"][1] == pytest.approx(np.std([1, 0, 0, 0], ddof=1) / 2)
    assert results["rows"][next(r for r in ablation.ROWS if r.student == "hiar").name] is None
    expected_r = np.corrcoef([0.3, 0.2, 0.1], [0.25, 0.18, 0.11])[0, 1]
    assert results["fig4"]["hiar_s0"]["pearson_r"] == pytest.approx(expected_r)
    md = (tmp_path / "dest" / "results.md").read_text()
    assert "0.500 ± 0.289 |" in md and "0.250 ± 0.250* |" in md and "not run" in md
    assert {"table2_segments.png", "table3_segments.png", "fig4_dynamics.png"} <= set(results["plots"])
    assert all((tmp_path / "dest" / "plots" / name).stat().st_size > 0 for name in results["plots"])


def test_report_keeps_scores_and_carries_rows_it_cannot_measure(tmp_path):
    """Score files are copied into dest/scores (kept in the repository) and back into a work folder that lost them; a
    row without score files keeps its previous results.json entry, marked; a row with score files is recomputed."""
    out, dest = tmp_path / "out", tmp_path / "dest"
    (out / "scores").mkdir(parents=True)
    hiar_fkl = next(r for r in ablation.ROWS if r.student == "hiar_fkl")
    clean = next(r for r in ablation.ROWS if r.student == "tc_clean")
    (out / "scores" / f"{hiar_fkl.eval_key(0)}.json").write_text(json.dumps(_scores([1, 0])))
    dest.mkdir()
    point = {"checkpoint": "ode_init.safetensors", "iteration": 0, "bidirectional": 0.3, "causal": 0.2}
    old = {"seeds": 1, "videos": 4, **{m: [0.75, 0.1] for m in ablation.MEASURES}, "fidelity_vs_ode_init": None,
           "segments": {"fidelity": [[0.75, 0.1]] * 5}}
    (dest / "results.json").write_text(json.dumps({"rows": {clean.name: old, hiar_fkl.name: {**old, "seeds": 9}},
                                                   "fig4": {"hiar_s5": {"points": [point], "pearson_r": None}},
                                                   "student_seconds": {"tc_clean_s0": 10.0}}))
    results = ablation.report(out, [0], dest=dest)
    assert (dest / "scores" / f"{hiar_fkl.eval_key(0)}.json").read_text() == json.dumps(_scores([1, 0]))
    assert results["rows"][clean.name] == {**old, "carried_over": True}
    assert results["rows"][hiar_fkl.name]["seeds"] == 1 and "carried_over" not in results["rows"][hiar_fkl.name]
    assert results["fig4"] == {"hiar_s5": {"points": [point], "pearson_r": None}}
    assert results["student_seconds"] == {"tc_clean_s0": 10.0}
    assert f"| {clean.name} † | 1 | 4 | 0.750 ± 0.100*" in (dest / "results.md").read_text()
    (out / "scores" / f"{hiar_fkl.eval_key(0)}.json").unlink()  # the work folder lost it: the kept copy comes back
    ablation.sync_scores(out, dest)
    assert (out / "scores" / f"{hiar_fkl.eval_key(0)}.json").read_text() == json.dumps(_scores([1, 0]))


def test_block_boundary_measures_split_motion_inside_and_across_blocks():
    import torch

    from src.worlds.toy.shapes import parse_prompt, render_video

    prompt = "a red square moving right on a black background"
    video = render_video(parse_prompt(prompt), 21, seed=3)
    truth = ablation.boundary_measures(video, prompt, frames_per_block=3)
    assert truth["direction_within"] == 1.0 and truth["direction_across"] == 1.0
    # each new block starts 2 px back (to the left) of where the last one ended: the within-block motion is intact
    jumping = torch.stack([torch.roll(frame, -2 * (k // 3), dims=-1) for k, frame in enumerate(video)])
    jumps = ablation.boundary_measures(jumping, prompt, frames_per_block=3)
    assert jumps["direction_within"] == 1.0 and jumps["direction_across"] == 0.0
    assert jumps["step_px_across"] == pytest.approx(2 - truth["step_px_across"], abs=0.05)
