"""`python -m evaluation.run` (conf/eval.yaml): videos -> every available metric -> report.md / report.json / plots.

Inputs (any combination):
- `videos_dir=DIR`: mp4 files, one subfolder per method (see `src.video_io`); prompts from `prompts_file=`
  JSON, src.generate's settings.json, or the file names.
- `generate.methods={name: {checkpoint: PATH, overrides: [...]}}`: each method's videos are generated first by
  `python -m src.generate` (a subprocess; overrides such as `sampler=block_first` or `world=...` pass through) for
  `generate.prompts` (null: the toy world's held-out prompts) into `<out_dir>/videos/<name>/`.
- toy world, `reference.enabled=auto|true`: the procedural ground truth of the held-out prompts (`src.worlds.toy.
  shapes.render_video`), evaluated as method `ground_truth` — the floor for drift and the ceiling for the oracle.
Metrics: the HiAR drift measures that have weights (`weights_dir`), Rolling Forcing's first/last imaging-quality gap
(MUSIQ), the frame-difference motion proxy, the toy-world oracle (`src.worlds.toy.oracle`, toy world only) and
VBench (`vbench.enabled=true`; its own environment, GPU and local weights).
"""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from evaluation.drift import video_drift
from evaluation.models import load_measures
from evaluation.report import jsonable, paired_comparison, summarise_method, write_report
from evaluation.vbench_runner import LONG_VIDEO_S, VBenchUnavailable, check_vbench, run_vbench
from src import artifacts
from src.schema import check_eval, refusals
from src.video_io import VideoEntry, list_videos, read_video, write_video

artifacts.setup_root()  # conf/paths reads $HIAR_ROOT

log = logging.getLogger(__name__)
REFERENCE_METHOD = "ground_truth"


def world_resolution(frames, video: DictConfig):
    """Frames [T, 3, H, W] shown upscaled for viewing -> the world's own resolution (area average, which undoes a
    nearest-neighbour upscale exactly and averages out codec artefacts), so the oracle sees what the model made."""
    height, width = int(video.height), int(video.width)
    fh, fw = frames.shape[-2] // height, frames.shape[-1] // width
    if fh < 1 or fw < 1 or (fh, fw) == (1, 1) or frames.shape[-2] % height or frames.shape[-1] % width:
        return frames  # not an upscale of the world's frames: the oracle measures them as they are
    return torch.nn.functional.avg_pool2d(frames, (frames.shape[-2] // height, frames.shape[-1] // width))


def _is_toy(cfg: DictConfig) -> bool:
    return cfg.world.name == "toy"


def _resolve_auto(value, cfg: DictConfig, what: str) -> bool:
    if value == "auto":
        return _is_toy(cfg)
    if isinstance(value, bool):
        return value
    raise ValueError(f"{what} must be true, false or auto, got {value!r}")


def render_reference(cfg: DictConfig, out_dir: Path) -> list[VideoEntry]:
    """The toy world's ground truth for the first `reference.prompts` held-out prompts, written as mp4."""
    from src.worlds.toy.shapes import heldout_prompts, parse_prompt, render_video

    num_frames = round(cfg.reference.duration_s * cfg.world.fps) + 1  # the first frame, then fps per second: 20 s -> 81
    entries = []
    for prompt in heldout_prompts(cfg.reference.prompts):
        for seed in cfg.reference.seeds:
            frames = render_video(parse_prompt(prompt), num_frames, cfg.world.video.height, cfg.world.video.width, seed)
            path = write_video(out_dir / REFERENCE_METHOD / f"{prompt}-{seed}.mp4", frames, cfg.world.fps)
            entries.append(VideoEntry(REFERENCE_METHOD, path, prompt))
    return entries


def generation_command(cfg: DictConfig, method: str, spec: DictConfig, prompts: str, out_dir: Path) -> list[str]:
    """`python -m src.generate ...` for one method (its own Hydra run folder inside the output folder)."""
    if spec.get("checkpoint") is None:
        raise ValueError(f"generate.methods.{method} needs a checkpoint")
    target = out_dir / "videos" / method
    return [
        sys.executable, "-m", "src.generate",
        f"checkpoint={spec.checkpoint}",
        f"prompts={prompts}",
        f"num_frames={cfg.generate.num_frames}",
        f"seed={cfg.generate.seed}",
        f"output_dir={target}",
        f"hydra.run.dir={out_dir / 'generate_runs' / method}",
        *[str(o) for o in spec.get("overrides", [])],
    ]


def generate_videos(cfg: DictConfig, out_dir: Path) -> list[VideoEntry]:
    """Run src.generate once per configured method; returns the entries of the videos it wrote."""
    prompts = cfg.generate.prompts
    if prompts is None:
        if not _is_toy(cfg):
            raise ValueError("generate.prompts is required outside the toy world")
        from src.worlds.toy.shapes import heldout_prompts

        prompts_path = out_dir / "generate_prompts.txt"
        prompts_path.write_text("\n".join(heldout_prompts(cfg.reference.prompts)) + "\n")
        prompts = str(prompts_path)
    entries = []
    for method, spec in cfg.generate.methods.items():
        cmd = generation_command(cfg, method, spec, prompts, out_dir)
        log.info("generating %s: %s", method, " ".join(cmd))
        subprocess.run(cmd, check=True)
        entries += list_videos(out_dir / "videos" / method)
    return entries


def _vbench_for_method(cfg: DictConfig, method_dir: Path, entries: list[VideoEntry], durations: list[float],
                       out_dir: Path) -> dict:
    long = cfg.vbench.long if cfg.vbench.long != "auto" else max(durations) >= LONG_VIDEO_S
    return run_vbench(
        method_dir,
        out_dir / "vbench" / method_dir.name,
        list(cfg.vbench.dimensions),
        name=method_dir.name,
        python=cfg.vbench.python,
        cache_dir=Path(cfg.vbench.cache_dir).expanduser(),
        long=bool(long),
        prompts={e.path.name: e.prompt for e in entries},
    )


def evaluate(cfg: DictConfig) -> dict[str, Path]:
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries: list[VideoEntry] = []
    if cfg.generate.methods:
        entries += generate_videos(cfg, out_dir)
    if cfg.videos_dir is not None:
        entries += list_videos(cfg.videos_dir, cfg.prompts_file)
    if _resolve_auto(cfg.reference.enabled, cfg, "reference.enabled"):
        if not _is_toy(cfg):
            raise ValueError("reference ground truth exists only for the toy world (world=toy)")
        entries += render_reference(cfg, out_dir / "videos")
    if not entries:
        raise ValueError("nothing to evaluate: pass videos_dir=<folder of mp4s> (methods = subfolders),"
                         " generate.methods={name: {checkpoint: PATH}}, or reference.enabled=true on the toy world")
    methods = sorted({e.method for e in entries}, key=[e.method for e in entries].index)
    for pair in cfg.compare:
        missing = [m for m in pair if m not in methods]
        if len(pair) != 2 or missing:
            raise ValueError(f"compare: each entry is [baseline, method] among {methods}, got {list(pair)}")

    use_vbench = bool(cfg.vbench.enabled)
    if use_vbench:  # fail before the slow part, naming everything missing
        check_vbench(list(cfg.vbench.dimensions), Path(cfg.vbench.cache_dir).expanduser(), cfg.vbench.python)
    oracle = None
    if _resolve_auto(cfg.oracle, cfg, "oracle"):
        from src.worlds.toy import oracle

    weights = OmegaConf.to_container(cfg.drift_weights)
    measures, unavailable = load_measures(cfg.weights_dir, tuple(cfg.measures), cfg.device)
    for name, reason in unavailable.items():
        log.warning("measure %s unavailable: %s", name, reason)

    results = {}
    vbench_status = "not requested (vbench.enabled=false)"
    for method in methods:
        group = [e for e in entries if e.method == method]
        videos, scores, durations = [], [], []
        for index, e in enumerate(group, 1):
            start = time.perf_counter()
            frames, fps = read_video(e.path)
            fps = float(cfg.fps) if cfg.fps is not None else fps
            r = video_drift(frames, measures, fps, cfg.segments, weights, unavailable)
            r.update(name=e.path.name, prompt=e.prompt, path=str(e.path))
            if oracle is not None:
                scores.append(oracle.score_video(world_resolution(frames, cfg.world.video), e.prompt, cfg.segments))
                r["oracle"] = jsonable(scores[-1])
            videos.append(r)
            durations.append(r["duration_s"])
            log.info("%s %d/%d: %s (%.1f s of video, measured in %.1f s)", method, index, len(group), e.path.name,
                     r["duration_s"], time.perf_counter() - start)
        oracle_summary = None
        if oracle is not None:
            oracle_summary = jsonable(oracle.summarise_scores(scores))
        vbench = None
        if use_vbench:
            method_dirs = {e.path.parent for e in group}
            if len(method_dirs) != 1:
                raise ValueError(f"method {method}: VBench needs all its videos in one folder, got {method_dirs}")
            vbench = _vbench_for_method(cfg, method_dirs.pop(), group, durations, out_dir)
            for v in videos:
                v["vbench"] = {d: r["per_video"].get(v["name"], math.nan) for d, r in vbench.items()}
            vbench_status = f"ran dimensions {list(cfg.vbench.dimensions)} (custom_input / VBench-Long)"
        results[method] = summarise_method(videos, oracle_summary, vbench)
        log.info("%s: %d videos, drift %s", method, len(videos), results[method]["summary"]["drift"])

    comparisons = []
    for baseline, method in cfg.compare:
        if oracle is None:
            raise ValueError("compare needs the toy-world oracle (oracle=auto on world=toy, or oracle=true)")
        comparisons.append({"baseline": baseline, "method": method,
                            **paired_comparison(results[baseline], results[method])})

    report = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "methods": results,
        "comparisons": comparisons,
        "unavailable": unavailable,
        "vbench_status": vbench_status,
    }
    paths = write_report(report, out_dir)
    log.info("report written to %s", paths["md"])
    return paths


@hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parents[1] / "conf"), config_name="eval")
def main(cfg: DictConfig) -> None:
    with refusals(cfg):  # a refused command prints one line and leaves no run folder
        check_eval(cfg)
        if cfg.vbench.enabled:
            check_vbench(list(cfg.vbench.dimensions), Path(cfg.vbench.cache_dir).expanduser(), cfg.vbench.python)
    try:
        evaluate(cfg)
    except VBenchUnavailable as err:
        raise SystemExit(str(err)) from None


if __name__ == "__main__":
    main()
