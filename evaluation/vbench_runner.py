"""VBench in its own environment (`make vbench-env` -> .venv-vbench; vbench 0.1.5, transformers 4.33.2, numpy < 2).

Two halves in one stdlib-only file:
- the caller's side (framework venv): `check_vbench` lists everything missing (the environment, CUDA, each weight
  file under VBENCH_CACHE_DIR) in one message; `build_command` makes the command line; `parse_results` reads the
  `<name>_eval_results.json` VBench writes ({dimension: [score, [{"video_path", "video_results"}, ...]]});
  `run_vbench` ties them together.
- the worker (`python evaluation/vbench_runner.py ...`, run by the VBench environment's Python): calls VBench's
  Python API in `custom_input` mode, or VBench-Long (`long_custom_input`) for long videos, with local weights only.

Only the six dimensions VBench supports for custom prompts are run: a custom-prompt run has no official
Semantic/Total score.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CUSTOM_DIMENSIONS = (
    "subject_consistency",
    "background_consistency",
    "motion_smoothness",
    "dynamic_degree",
    "aesthetic_quality",
    "imaging_quality",
)
# weight files each dimension reads from VBENCH_CACHE_DIR with load_ckpt_from_local (vbench 0.1.5 layout)
REQUIRED_FILES = {
    "subject_consistency": (
        "dino_model/facebookresearch_dino_main/hubconf.py",
        "dino_model/dino_vitbase16_pretrain.pth",
    ),
    "background_consistency": ("clip_model/ViT-B-32.pt",),
    "motion_smoothness": ("amt_model/amt-s.pth",),
    "dynamic_degree": ("raft_model/models/raft-things.pth",),
    "aesthetic_quality": ("clip_model/ViT-L-14.pt", "aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth"),
    "imaging_quality": ("pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",),
}
DEFAULT_PYTHON = ".venv-vbench/bin/python"
# videos at least this long go through VBench-Long (it splits them into clips first)
LONG_VIDEO_S = 10.0


class VBenchUnavailable(RuntimeError):
    """VBench cannot run here; the message names everything that is missing."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("VBENCH_CACHE_DIR", "~/.cache/vbench")).expanduser()


def _validate_dimensions(dimensions: list[str] | tuple[str, ...]) -> None:
    bad = [d for d in dimensions if d not in CUSTOM_DIMENSIONS]
    if bad or not dimensions:
        raise ValueError(f"VBench custom-input dimensions must be among {CUSTOM_DIMENSIONS}, got {list(dimensions)}")


def missing_files(dimensions: list[str] | tuple[str, ...], cache_dir: str | Path) -> list[str]:
    _validate_dimensions(dimensions)
    cache = Path(cache_dir)
    seen, missing = set(), []
    for dim in dimensions:
        for rel in REQUIRED_FILES[dim]:
            if rel not in seen and not (cache / rel).is_file():
                missing.append(f"{cache / rel} (for {dim})")
            seen.add(rel)
    return missing


def _cuda_available(python: str) -> bool:
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([python, "-c", probe], capture_output=True, timeout=300).returncode == 0


def check_vbench(dimensions: list[str] | tuple[str, ...], cache_dir: str | Path, python: str = DEFAULT_PYTHON) -> None:
    """Raise VBenchUnavailable naming every missing piece (environment, CUDA, each weight file), else return."""
    problems = []
    if not Path(python).is_file():
        problems.append(f"the VBench environment: {python} does not exist (build it with `make vbench-env`)")
    elif not _cuda_available(python):
        problems.append(f"CUDA: torch in {python} sees no GPU (VBench's evaluators run on CUDA only)")
    missing = missing_files(dimensions, cache_dir)
    problems += [f"weight file {f}" for f in missing]
    if problems:
        fill = (f"\nFill the cache on a machine with internet (VBench's local mode fetches each missing file with wget),"
                f" then copy the folder here:\n  {fill_command(dimensions, cache_dir, python)}") if missing else ""
        raise VBenchUnavailable(
            "VBench cannot run; missing:\n  - " + "\n  - ".join(problems)
            + f"\n(VBENCH_CACHE_DIR={cache_dir}; nothing is downloaded at run time)" + fill
        )


def fill_command(dimensions: list[str] | tuple[str, ...], cache_dir: str | Path, python: str = DEFAULT_PYTHON) -> str:
    """The command that downloads the weights of `dimensions` into `cache_dir` (VBench's init_submodules in local
    mode, run by the VBench environment)."""
    code = f"from vbench.utils import init_submodules; init_submodules({list(dimensions)!r}, local=True)"
    return f"VBENCH_CACHE_DIR={cache_dir} {python} -c \"{code}\""


def build_command(
    videos_dir: str | Path,
    output_dir: str | Path,
    dimensions: list[str] | tuple[str, ...],
    name: str,
    *,
    python: str = DEFAULT_PYTHON,
    long: bool = False,
    prompt_file: str | Path | None = None,
) -> list[str]:
    """The worker's command line (run with VBENCH_CACHE_DIR and the offline flags in its environment)."""
    _validate_dimensions(dimensions)
    cmd = [
        python, str(Path(__file__).resolve()),
        "--videos_path", str(videos_dir),
        "--output_path", str(output_dir),
        "--name", name,
        "--mode", "long_custom_input" if long else "custom_input",
        "--dimension", *dimensions,
    ]
    if prompt_file is not None:
        cmd += ["--prompt_file", str(prompt_file)]
    return cmd


def worker_env(cache_dir: str | Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        VBENCH_CACHE_DIR=str(cache_dir),
        TORCH_HOME=str(Path(cache_dir) / "torch"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    return env


def results_path(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir) / f"{name}_eval_results.json"


def parse_results(path: str | Path) -> dict[str, dict]:
    """VBench's results JSON -> {dimension: {"score": float, "per_video": {file name: value}}}.

    Per-video values are floats (booleans for dynamic_degree, as VBench writes them, become 0.0/1.0).
    """
    raw = json.loads(Path(path).read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected {{dimension: [score, [per-video results]]}}")
    parsed = {}
    for dim, value in raw.items():
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[1], list)):
            raise ValueError(f"{path}: dimension {dim!r} is not [score, [per-video results]]")
        per_video = {}
        for item in value[1]:
            result = item.get("video_results") if isinstance(item, dict) else None
            if not isinstance(result, (int, float)) or "video_path" not in item:
                raise ValueError(f"{path}: {dim!r} has a per-video entry without a numeric video_results: {item!r}")
            per_video[Path(item["video_path"]).name] = float(result)
        parsed[dim] = {"score": float(value[0]), "per_video": per_video}
    return parsed


def run_vbench(
    videos_dir: str | Path,
    output_dir: str | Path,
    dimensions: list[str] | tuple[str, ...],
    name: str,
    *,
    python: str = DEFAULT_PYTHON,
    cache_dir: str | Path | None = None,
    long: bool = False,
    prompts: dict[str, str] | None = None,
) -> dict[str, dict]:
    """Evaluate the mp4 files of `videos_dir` (not recursive) and return `parse_results` of VBench's output.

    VBench-Long writes clip folders next to its input, so the videos are linked into `output_dir/videos` first.
    `prompts`: {file name: prompt}; without it VBench takes prompts from the file names.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    check_vbench(dimensions, cache_dir, python)
    output_dir = Path(output_dir).resolve()
    staged = output_dir / "videos"
    staged.mkdir(parents=True, exist_ok=True)
    for video in sorted(Path(videos_dir).glob("*.mp4")):
        link = staged / video.name
        if not link.exists():
            link.symlink_to(video.resolve())
    prompt_file = None
    if prompts:
        prompt_file = output_dir / "prompts.json"
        prompt_file.write_text(json.dumps(prompts, indent=2))
    cmd = build_command(staged, output_dir, dimensions, name, python=python, long=long, prompt_file=prompt_file)
    subprocess.run(cmd, env=worker_env(cache_dir), check=True)
    return parse_results(results_path(output_dir, name))


# ----------------------------------------------------------------------------------------------------------------
# worker: runs inside the VBench environment


def _worker(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run VBench (custom_input) or VBench-Long on a folder of videos")
    parser.add_argument("--videos_path", required=True)
    parser.add_argument("--output_path", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--mode", choices=("custom_input", "long_custom_input"), required=True)
    parser.add_argument("--dimension", nargs="+", required=True)
    parser.add_argument("--prompt_file")
    args = parser.parse_args(argv)
    _validate_dimensions(args.dimension)

    import torch
    import vbench

    prompts = json.loads(Path(args.prompt_file).read_text()) if args.prompt_file else []
    full_info = str(Path(vbench.__file__).parent / "VBench_full_info.json")
    device = torch.device("cuda")
    kwargs = {"imaging_quality_preprocessing_mode": "longer"}
    if args.mode == "long_custom_input":
        import vbench2_beta_long
        from vbench2_beta_long import VBenchLong

        bench = VBenchLong(device, full_info, args.output_path)
        # eval_long.py's defaults without --dev_flag: DINO / CLIP clip-to-clip extractors with weight 0
        kwargs.update(
            sb_clip2clip_feat_extractor="dino",
            bg_clip2clip_feat_extractor="clip",
            clip_length_config="clip_length_mix.yaml",
            w_inclip=1.0,
            w_clip2clip=0.0,
            use_semantic_splitting=False,
            slow_fast_eval_config=str(Path(vbench2_beta_long.__file__).parent / "configs" / "slow_fast_params.yaml"),
            dev_flag=False,
            static_filter_flag=False,
        )
    else:
        bench = vbench.VBench(device, full_info, args.output_path)
    bench.evaluate(
        videos_path=args.videos_path,
        name=args.name,
        prompt_list=prompts,
        dimension_list=args.dimension,
        local=True,
        read_frame=False,
        mode=args.mode,
        **kwargs,
    )


if __name__ == "__main__":
    _worker(sys.argv[1:])
