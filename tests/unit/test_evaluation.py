"""Drift measures with known answers, the VBench runner (command line, parsing, missing pieces), the report."""

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from evaluation import vbench_runner
from evaluation.drift import drift_score, normalised_slope, quality_first_last, video_drift
from evaluation.measures import (
    fit_slope,
    frame_difference,
    hsv_saturation,
    laplacian_variance,
    segment_bounds,
    segment_means,
    to_unit,
)
from evaluation.models import DINOV2_DIR, load_measures
from src.video_io import list_videos, prompt_from_filename, read_video, write_video

FIXTURE = Path(__file__).parents[1] / "fixtures" / "vbench" / "hiar_eval_results.json"
ROOT = Path(__file__).resolve().parents[2]
CONF = str(ROOT / "conf")


def eval_config(tmp_path, *overrides):
    # composed outside a Hydra run: give the paths that normally come from ${hydra:runtime...}
    paths = [f"paths.root_dir={ROOT}", f"paths.output_dir={tmp_path / 'out'}", f"out_dir={tmp_path / 'out'}"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("eval", overrides=[*paths, "weights_dir=null", *overrides])


def constant_video(rgb01, t=10, h=8, w=8):
    return (torch.tensor(rgb01).view(1, 3, 1, 1).expand(t, 3, h, w) * 2 - 1).clone()


def test_saturation_of_constant_colours():
    # S = (max - min) / max: pure red 1, grey 0, (0.8, 0.4, 0.2) -> 0.75, black 0 by convention
    for rgb, expected in [((1.0, 0.0, 0.0), 1.0), ((0.5, 0.5, 0.5), 0.0), ((0.8, 0.4, 0.2), 0.75), ((0, 0, 0), 0.0)]:
        sat = hsv_saturation(to_unit(constant_video(rgb)))
        assert torch.allclose(sat, torch.full((10,), expected), atol=1e-5), rgb


def test_laplacian_variance_of_checkerboard_and_flat():
    board = ((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2).float()  # 1-pixel 0/1 checkerboard
    frames = board.expand(2, 3, 8, 8).clone()
    # interior Laplacian is +-4 (x 255 in 8-bit units), mean 0 -> variance 16 * 255^2
    assert torch.allclose(laplacian_variance(frames), torch.full((2,), 16 * 255.0**2))
    assert torch.allclose(laplacian_variance(torch.full((2, 3, 8, 8), 0.3)), torch.zeros(2), atol=1e-6)
    # a linear ramp has zero Laplacian
    ramp = torch.linspace(0, 1, 8).view(1, 1, 1, 8).expand(1, 3, 8, 8)
    assert laplacian_variance(ramp).abs().max() < 1e-6


def test_slope_of_linear_ramp_and_constant():
    assert fit_slope([0.2, 0.4, 0.6, 0.8, 1.0]) == pytest.approx(1.0)  # +0.2 per segment of 5 -> +1 per video
    assert fit_slope([3.0] * 5) == pytest.approx(0.0)
    assert fit_slope([1.0, 0.0]) == pytest.approx(-2.0)


def test_segments_cover_frames_and_pairwise_means():
    bounds = segment_bounds(23, 5)
    assert bounds[0][0] == 0 and bounds[-1][1] == 23
    assert all(b[0] == a[1] for a, b in zip(bounds, bounds[1:]))
    assert {e - s for s, e in bounds} <= {4, 5}
    with pytest.raises(ValueError, match="too short"):
        segment_bounds(9, 5)
    per_pair = torch.arange(9.0)  # pairs (t, t+1) for 10 frames
    assert segment_means(per_pair, segment_bounds(10, 5), pairwise=True) == [0.0, 2.0, 4.0, 6.0, 8.0]


def test_frame_difference_static_and_moving():
    assert frame_difference(to_unit(constant_video((0.2, 0.4, 0.6)))).abs().max() == 0
    flicker = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)] * 2)
    assert torch.allclose(frame_difference(flicker), torch.ones(3))


def test_video_drift_brightening_video():
    # grey level rising linearly: saturation 0 throughout, Laplacian 0; a fading colour gives a saturation slope
    t = 20
    level = torch.linspace(0.2, 0.8, t)
    frames = torch.stack([torch.tensor([v, v * 0.5, v * 0.5]).view(3, 1, 1).expand(3, 6, 6) for v in level]) * 2 - 1
    measures, unavailable = load_measures(None)
    assert set(measures) == {"hsv_saturation", "laplacian_variance"}
    assert set(unavailable) == {"musiq", "clip_iqa", "dinov2_cos", "lpips"}
    r = video_drift(frames, measures, fps=4.0, segments=5, unavailable=unavailable)
    assert r["segments"]["hsv_saturation"] == pytest.approx([0.5] * 5, abs=1e-6)  # (v - v/2) / v
    assert r["drift"] == pytest.approx(0.0, abs=1e-6)
    assert r["drift_measures"] == ["hsv_saturation", "laplacian_variance"]
    assert r["imaging_quality_first_last"] is None and r["unavailable"] == unavailable
    assert r["motion_proxy_frame_diff"] == pytest.approx(float(frame_difference(to_unit(frames)).mean()))


def test_drift_score_normalisation_and_weights():
    assert normalised_slope("hsv_saturation", 0.3, [0.1] * 5) == pytest.approx(0.3)
    assert normalised_slope("laplacian_variance", 50.0, [100.0] * 5) == pytest.approx(0.5)
    assert drift_score({"hsv_saturation": -0.3, "laplacian_variance": 0.5}) == pytest.approx(0.4)
    weights = {"hsv_saturation": 3.0, "laplacian_variance": 1.0}
    assert drift_score({"hsv_saturation": -0.3, "laplacian_variance": 0.5}, weights) == pytest.approx(0.35)
    assert drift_score({}) is None


def test_quality_first_last_windows():
    q = torch.cat([torch.full((80,), 0.7), torch.full((80,), 0.6)])  # 10 s at 16 fps
    r = quality_first_last(q, fps=16)
    assert r["delta_pct"] == pytest.approx(10.0) and r["window_s"] == pytest.approx(5.0)
    assert quality_first_last(torch.arange(10.0), fps=16)["window_s"] == pytest.approx(5 / 16)  # half a short video


def test_missing_weights_are_named(tmp_path):
    measures, unavailable = load_measures(tmp_path, ("clip_iqa", "dinov2_cos", "lpips", "musiq"))
    assert measures == {}
    assert str(tmp_path / "clip-vit-base-patch16" / "config.json") in unavailable["clip_iqa"]
    assert "preprocessor_config.json" in unavailable["clip_iqa"]
    assert str(tmp_path / DINOV2_DIR / "config.json") in unavailable["dinov2_cos"]
    assert "alexnet-owt-7be5be79.pth" in unavailable["lpips"]
    assert "musiq_spaq_ckpt-358bb6af.pth" in unavailable["musiq"]
    with pytest.raises(ValueError, match="unknown measure"):
        load_measures(tmp_path, ("fid",))


def test_dinov2_loads_from_local_folder_only(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       patch_size=56, image_size=224)
    torch.manual_seed(0)
    Dinov2Model(cfg).save_pretrained(tmp_path / DINOV2_DIR)
    measures, unavailable = load_measures(tmp_path, ("dinov2_cos",))
    assert "dinov2_cos" not in unavailable
    frames = to_unit(constant_video((0.3, 0.6, 0.9), t=4, h=16, w=16))
    cos = measures["dinov2_cos"](frames)
    assert cos.shape == (3,) and torch.allclose(cos, torch.ones(3), atol=1e-5)  # identical frames


def test_video_io_roundtrip_and_prompts(tmp_path):
    frames = constant_video((0.9, 0.1, 0.1), t=6, h=8, w=8)
    write_video(tmp_path / "m1" / "a red circle moving left on a black background-3.mp4", frames, fps=8, upscale=1)
    write_video(tmp_path / "m2" / "x-0.mp4", frames, fps=8)
    (tmp_path / "prompts.json").write_text(json.dumps({"m2/x-0.mp4": "a custom prompt"}))
    back, fps = read_video(tmp_path / "m1" / "a red circle moving left on a black background-3.mp4")
    assert fps == 8 and back.shape == frames.shape and (back - frames).abs().max() < 0.05
    entries = list_videos(tmp_path, tmp_path / "prompts.json")
    assert [(e.method, e.prompt) for e in entries] == [
        ("m1", "a red circle moving left on a black background"), ("m2", "a custom prompt")]
    assert prompt_from_filename("a cat-12.mp4") == "a cat"
    with pytest.raises(FileNotFoundError):
        list_videos(tmp_path / "m3")


def test_vbench_command_line(tmp_path):
    dims = ["subject_consistency", "imaging_quality"]
    cmd = vbench_runner.build_command(tmp_path / "v", tmp_path / "o", dims, "hiar", python="/venv/bin/python",
                                      prompt_file=tmp_path / "p.json")
    assert cmd[0] == "/venv/bin/python" and cmd[1].endswith("evaluation/vbench_runner.py")
    assert cmd[cmd.index("--mode") + 1] == "custom_input"
    assert cmd[cmd.index("--dimension") + 1 : cmd.index("--dimension") + 3] == dims
    assert cmd[cmd.index("--prompt_file") + 1] == str(tmp_path / "p.json")
    long_cmd = vbench_runner.build_command(tmp_path / "v", tmp_path / "o", dims, "hiar", long=True)
    assert long_cmd[long_cmd.index("--mode") + 1] == "long_custom_input"
    with pytest.raises(ValueError, match="custom-input dimensions"):
        vbench_runner.build_command(tmp_path, tmp_path, ["object_class"], "x")
    env = vbench_runner.worker_env(tmp_path)
    assert env["VBENCH_CACHE_DIR"] == str(tmp_path) and env["HF_HUB_OFFLINE"] == "1"


def test_vbench_worker_parses_its_arguments(monkeypatch, tmp_path):
    calls = {}

    class FakeBench:
        def __init__(self, device, full_info, output_path):
            calls["init"] = (str(device), Path(full_info).name, output_path)

        def evaluate(self, **kwargs):
            calls["evaluate"] = kwargs

    fake = types.SimpleNamespace(VBench=FakeBench, __file__=str(tmp_path / "vbench" / "__init__.py"))
    monkeypatch.setitem(sys.modules, "vbench", fake)
    (tmp_path / "p.json").write_text(json.dumps({"a-0.mp4": "a"}))
    prompts = tmp_path / "p.json"
    cmd = vbench_runner.build_command(tmp_path, tmp_path / "o", ["dynamic_degree"], "run", prompt_file=prompts)
    vbench_runner._worker(cmd[2:])
    assert calls["init"] == ("cuda", "VBench_full_info.json", str(tmp_path / "o"))
    kw = calls["evaluate"]
    assert kw["mode"] == "custom_input" and kw["local"] is True and kw["dimension_list"] == ["dynamic_degree"]
    assert kw["prompt_list"] == {"a-0.mp4": "a"} and kw["name"] == "run"


def test_vbench_results_parsing():
    parsed = vbench_runner.parse_results(FIXTURE)
    assert set(parsed) == {"subject_consistency", "dynamic_degree", "imaging_quality"}
    assert parsed["imaging_quality"]["score"] == pytest.approx(0.6843021488189697)
    assert parsed["dynamic_degree"]["per_video"] == {
        "a red circle moving left on a black background-0.mp4": 1.0,
        "a green square moving up on a gray background-0.mp4": 0.0,
    }


def test_vbench_missing_pieces_in_one_message(tmp_path):
    dims = ["dynamic_degree", "imaging_quality", "aesthetic_quality"]
    with pytest.raises(vbench_runner.VBenchUnavailable) as err:
        vbench_runner.check_vbench(dims, tmp_path / "cache", python=str(tmp_path / "no-venv" / "bin" / "python"))
    msg = str(err.value)
    assert "make vbench-env" in msg
    assert f"VBENCH_CACHE_DIR={tmp_path / 'cache'} " in msg and "init_submodules(" in msg  # how to fill the cache
    for rel in ["raft_model/models/raft-things.pth", "pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",
                "clip_model/ViT-L-14.pt", "aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth"]:
        assert str(tmp_path / "cache" / rel) in msg
    (tmp_path / "cache" / "raft_model" / "models").mkdir(parents=True)
    (tmp_path / "cache" / "raft_model" / "models" / "raft-things.pth").write_bytes(b"")
    assert vbench_runner.missing_files(["dynamic_degree"], tmp_path / "cache") == []


def _fake_oracle(monkeypatch):
    def score_video(frames, prompt, segments=5):
        return {"fidelity": torch.tensor(1.0), "object_found": 1.0, "segments": [1.0] * segments, "drift": 0.0}

    def summarise_scores(scores):
        return {"fidelity": 1.0, "direction_agreement": 0.75, "segments": [1.0, 1.0, 0.9, 0.8, 0.7], "drift": -0.1}

    module = types.SimpleNamespace(score_video=score_video, summarise_scores=summarise_scores)
    monkeypatch.setitem(sys.modules, "src.worlds.toy.oracle", module)
    import src.worlds.toy

    monkeypatch.setattr(src.worlds.toy, "oracle", module, raising=False)


def test_eval_entry_point_writes_report(monkeypatch, tmp_path):
    from evaluation.run import evaluate

    _fake_oracle(monkeypatch)
    videos = tmp_path / "videos"
    prompt = "a red circle moving left on a black background"
    for method, level in [("fading", torch.linspace(1.0, 0.4, 20)), ("steady", torch.full((20,), 0.8))]:
        frames = torch.stack([torch.tensor([v, 0.1, 0.1]).view(3, 1, 1).expand(3, 8, 8) for v in level]) * 2 - 1
        write_video(videos / method / f"{prompt}-0.mp4", frames, fps=8)
    cfg = eval_config(tmp_path, f"videos_dir={videos}", "reference.prompts=1", "reference.duration_s=5")
    paths = evaluate(cfg)
    report = json.loads(paths["json"].read_text())
    assert list(report["methods"]) == ["fading", "steady", "ground_truth"]
    fading, steady = report["methods"]["fading"]["summary"], report["methods"]["steady"]["summary"]
    assert fading["drift"] > steady["drift"] >= 0
    assert fading["oracle"]["direction_agreement"] == 0.75
    assert report["methods"]["fading"]["videos"][0]["oracle"]["fidelity"] == 1.0
    assert set(report["unavailable"]) == {"musiq", "clip_iqa", "dinov2_cos", "lpips"}
    md = paths["md"].read_text()
    assert "| fading |" in md and "unavailable (no MUSIQ)" in md and "motion_proxy_frame_diff" in md
    for name in ["segments_png", "hsv_saturation_png", "oracle_fidelity_png"]:
        assert paths[name].stat().st_size > 1000


def test_eval_refuses_vbench_without_environment(monkeypatch, tmp_path):
    from evaluation.run import evaluate

    _fake_oracle(monkeypatch)
    cfg = eval_config(tmp_path, "vbench.enabled=true", "reference.prompts=1", f"vbench.python={tmp_path}/none/python",
                      f"vbench.cache_dir={tmp_path}/c")
    with pytest.raises(vbench_runner.VBenchUnavailable, match="amt-s.pth"):
        evaluate(cfg)


def test_generation_command_and_generated_prompts(tmp_path):
    from evaluation.run import generation_command

    cfg = eval_config(tmp_path, "+generate.methods.bf.checkpoint=/ck.safetensors",
                      '+generate.methods.bf.overrides=["sampler=block_first"]')
    cmd = generation_command(cfg, "bf", cfg.generate.methods.bf, "/p.txt", tmp_path)
    assert cmd[1:3] == ["-m", "src.generate"] and "checkpoint=/ck.safetensors" in cmd and "prompts=/p.txt" in cmd
    assert f"output_dir={tmp_path / 'videos' / 'bf'}" in cmd and "num_frames=81" in cmd
    assert cmd[-1] == "sampler=block_first"
    # src.generate names files 0000_<slug>.mp4 and records the prompts in settings.json
    write_video(tmp_path / "gen" / "bf" / "0000_a_red.mp4", constant_video((1, 0, 0), t=4), fps=4)
    (tmp_path / "gen" / "bf" / "settings.json").write_text(
        json.dumps({"videos": [{"prompt": "a red circle", "file": "0000_a_red.mp4"}]}))
    assert [e.prompt for e in list_videos(tmp_path / "gen")] == ["a red circle"]


def test_fetch_weights_fills_the_layout_the_measures_check(tmp_path, monkeypatch):
    """python -m evaluation.fetch_weights writes every file evaluation.models looks for (downloads stubbed)."""
    import huggingface_hub

    from evaluation import fetch_weights
    from evaluation.models import DRIFT_MEASURES, _unavailable_reason

    def snapshot(repo, local_dir, allow_patterns):
        for name in allow_patterns:
            (Path(local_dir) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(local_dir) / name).write_bytes(b"x")

    def hub_file(repo, filename, local_dir):
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / filename).write_bytes(b"x")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub_file)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, dst: Path(dst).write_bytes(b"x"))
    fetch_weights.main(["--out", str(tmp_path)])
    for name in DRIFT_MEASURES:
        assert "missing weights" not in (_unavailable_reason(name, tmp_path) or "")


def test_paired_comparison_is_the_mean_and_standard_error_of_per_video_differences():
    from evaluation.report import paired_comparison

    def method(per_video):  # (whole-video score, per-segment scores) per video
        return {"videos": [{"name": f"v{i}.mp4", "oracle": {"fidelity": whole, "segments": {"fidelity": segments}}}
                           for i, (whole, segments) in enumerate(per_video)]}

    baseline = method([(0.0, [0.0, 0.0]), (0.0, [1.0, 0.0]), (1.0, [0.0, 1.0]), (1.0, [1.0, 1.0])])
    student = method([(1.0, [1.0, 0.0]), (1.0, [1.0, 1.0]), (1.0, [1.0, 1.0])])  # v3 missing: only shared ones pair
    result = paired_comparison(baseline, student, measures=("fidelity",))
    assert result["videos"] == 3
    fidelity = result["measures"]["fidelity"]
    # per segment the differences are {1, 0, 1} and {0, 1, 0}: mean 2/3 and 1/3, sd sqrt(1/3), se 1/3
    assert fidelity["per_segment"]["mean"] == pytest.approx([2 / 3, 1 / 3])
    assert fidelity["per_segment"]["se"] == pytest.approx([1 / 3, 1 / 3])
    # the whole video (the oracle's 20 s score, not the mean of segments): differences {1, 1, 0}
    assert fidelity["video"] == pytest.approx({"mean": 2 / 3, "se": 1 / 3})
    with pytest.raises(ValueError, match="share no scored video"):
        paired_comparison(method([(1.0, [1.0])]), {"videos": [{"name": "other.mp4", "oracle": {"segments": {}}}]})


def test_eval_compares_two_methods_on_the_same_prompts_with_the_real_oracle(tmp_path):
    """A frozen copy of each ground-truth video loses the motion measures against the moving original, seen in the
    report's paired section; the oracle's per-segment standard errors are reported beside the means."""
    from evaluation.run import evaluate
    from src.worlds.toy.shapes import heldout_prompts, parse_prompt, render_video

    videos = tmp_path / "videos"
    for prompt in heldout_prompts(3):
        frames = render_video(parse_prompt(prompt), 21, 16, 16, 0)
        write_video(videos / "moving" / f"{prompt}-0.mp4", frames, fps=4)
        write_video(videos / "frozen" / f"{prompt}-0.mp4", frames[:1].expand_as(frames), fps=4)
    cfg = eval_config(tmp_path, f"videos_dir={videos}", "reference.enabled=false", "measures=[]",
                      "compare=[[frozen, moving]]")
    paths = evaluate(cfg)
    report = json.loads(paths["json"].read_text())
    (comparison,) = report["comparisons"]
    assert (comparison["baseline"], comparison["method"], comparison["videos"]) == ("frozen", "moving", 3)
    assert comparison["measures"]["motion"]["video"]["mean"] > 0.2  # px per frame the frozen copy does not move
    assert comparison["measures"]["direction_agreement"]["video"]["mean"] > 0.5
    oracle = report["methods"]["moving"]["summary"]["oracle"]
    assert len(oracle["segments_se"]["fidelity"]) == len(oracle["segments"]["fidelity"]) == 5
    assert "## Paired: moving minus frozen (3 videos" in paths["md"].read_text()
    with pytest.raises(ValueError, match="compare"):
        evaluate(eval_config(tmp_path, f"videos_dir={videos}", "reference.enabled=false", "measures=[]",
                             "compare=[[frozen, absent]]"))


def test_the_oracle_scores_clamped_pixels(monkeypatch):
    """Pixels outside [-1, 1] are scored as the video file holding them (clamped) would be."""
    from src.worlds.toy import oracle
    from src.worlds.toy.shapes import parse_prompt, render_video

    prompt = "a red circle moving left on a black background"
    loud = render_video(parse_prompt(prompt), 15, 16, 16, 0) * 2.5 + 0.3
    analysed, analyse = [], oracle.analyse_frames
    monkeypatch.setattr(oracle, "analyse_frames", lambda frames, attrs: analysed.append(frames) or analyse(frames, attrs))
    assert repr(oracle.score_video(loud, prompt)) == repr(oracle.score_video(loud.clamp(-1, 1), prompt))  # NaN-safe
    assert torch.equal(analysed[0], loud.clamp(-1, 1))
