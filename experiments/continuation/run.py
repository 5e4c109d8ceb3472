"""Continuation in the toy world (issue 29): give the first blocks of held-out ground-truth videos as context, continue
them to 81 frames (20 s), and score with the oracle how seamless the continuation is.

    .venv/bin/python -m experiments.continuation.run --hiar HIAR.safetensors --self-forcing SF.safetensors

Per video (held-out prompt p, ground truth rendered with seed i, as experiments/toy_ablation renders its own): the
first m blocks (m * 3 latent frames = pixel frames in the toy world) are the context (src/continuation.py, written into
the KV cache by the sampler's clean-context write); the sampler continues from frame K = 3m with noise
NoiseBank(EVAL_SEED + batch). Measures (src/worlds/toy/oracle.py; decoded pixels clamped to [-1, 1] first):
* seam error: the object's position (oracle centroid) in the first generated frame K against the ground truth's
  frame K, on the torus, px of the 16 x 16 frame; the median over videos (a frame without the object counts as an
  infinite error) and the fraction of seam frames with the object found;
* after the seam (frames K..80, about 19 s, scored against the prompt in force after the seam): object found, colour
  error, shape agreement, direction agreement per ~4 s segment (5 segments) and fidelity;
* rows: each student and sampler order, without and with a prompt switch at the seam (the direction turned by 90
  degrees: left -> up -> right -> down -> left); the same student from scratch (no context; the same frames K..80
  scored) and the ground truth.
Scores go to outputs/continuation/scores/<row>.json (skipped when present); the table to results.{md,json} here.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from src.io import atomic_write_text  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = ROOT / "outputs" / "continuation"
NUM_FRAMES, BATCH, SEGMENTS = 81, 16, 5
EVAL_SEED = 1000  # batch b draws its noise from NoiseBank(EVAL_SEED + b), as experiments/toy_ablation does
TURN = {"left": "up", "up": "right", "right": "down", "down": "left"}  # the prompt switch at the seam


@dataclass(frozen=True)
class Row:
    name: str
    student: str  # "hiar" | "self_forcing" | "truth"
    order: str | None
    context: bool  # False: from scratch
    switch: bool = False

    def key(self, blocks: int) -> str:
        what = "switch" if self.switch else ("context" if self.context else "scratch")
        return f"{self.student}_{self.order}_{what}_m{blocks}" if self.order else f"truth_m{blocks}"


ROWS = [Row("ground truth", "truth", None, True)]
for _student, _order, _label in (("hiar", "step_first", "HiAR student, step-first"),
                                 ("hiar", "block_first", "HiAR student, block-first"),
                                 ("self_forcing", "block_first", "Self-Forcing, block-first")):
    ROWS += [Row(_label, _student, _order, True), Row(f"{_label}, prompt switch at the seam", _student, _order, True,
                                                      True),
             Row(f"{_label}, from scratch", _student, _order, False)]
# evaluation order (a run stopped early still answers the targets): the continuations, the from-scratch baselines of
# the two main rows, the prompt switches, the last baseline
PRIORITY = [0, 1, 7, 4, 3, 9, 2, 8, 5, 6]


def evaluation_set(num_prompts: int, noise_seeds: int) -> tuple[list[str], torch.Tensor]:
    """Held-out prompts (each noise_seeds times) and their ground-truth videos [N, 81, 3, 16, 16] (video i: seed i)."""
    from src.worlds.toy.shapes import heldout_prompts, parse_prompt, render_video

    prompts = [p for p in heldout_prompts(num_prompts) for _ in range(noise_seeds)]
    return prompts, torch.stack([render_video(parse_prompt(p), NUM_FRAMES, 16, 16, seed=i)
                                 for i, p in enumerate(prompts)])


def turned(prompt: str) -> str:
    from src.worlds.toy.shapes import parse_prompt, prompt_from_attributes

    attrs = parse_prompt(prompt)
    return prompt_from_attributes({**attrs, "direction": TURN[attrs["direction"]]})


def generate(pipe, row: Row, prompts: list[str], truth: torch.Tensor, blocks: int) -> torch.Tensor:
    """Videos [N, 81, 3, 16, 16] in [-1, 1] (clamped): continuations of the truth's first `blocks` blocks, or from
    scratch; BATCH at a time through the samplers' one code path."""
    from src.continuation import encode_context
    from src.sampling.noise import NoiseBank
    from src.sampling.orders import sample

    f = pipe.sampler.frames_per_block
    videos = []
    with torch.no_grad():
        for b, start in enumerate(range(0, len(prompts), BATCH)):
            batch = prompts[start:start + BATCH]
            cond = pipe.text_encoder.encode(batch)[0].to(pipe.device)
            if row.switch:
                cond = {0: cond, blocks: pipe.text_encoder.encode([turned(p) for p in batch])[0].to(pipe.device)}
            prefix = None
            if row.context:
                prefix, _ = encode_context(pipe.codec, truth[start:start + BATCH, :blocks * f], frames_per_block=f,
                                           height=16, width=16, context_frames=blocks * f, device=pipe.device)
            latents = sample(pipe.model, cond, NUM_FRAMES, pipe.latent_shape, pipe.sampler, NoiseBank(EVAL_SEED + b),
                             order=row.order, prefix=prefix)
            videos.append(pipe.codec.decode(latents).clamp(-1, 1).cpu())
    return torch.cat(videos)


def seam_error(video: torch.Tensor, truth: torch.Tensor, prompt: str, k: int) -> float:
    """|position in generated frame k - position in the truth's frame k| on the torus, px (inf: object not found)."""
    from src.worlds.toy.oracle import analyse_frames
    from src.worlds.toy.shapes import parse_prompt, wrapped

    attrs = parse_prompt(prompt)  # colour, shape and background: the same on both sides of a direction switch
    both = analyse_frames(torch.stack([video[k], truth[k]]), attrs)
    generated, reference = both["position"]
    if np.isnan(generated).any() or np.isnan(reference).any():
        return math.inf
    return float(np.linalg.norm(wrapped(generated - reference, np.array(both["size"], dtype=np.float64)))
                 / both["scale"])


def score(videos: torch.Tensor, truth: torch.Tensor, prompts: list[str], row: Row, blocks: int, k: int) -> list[dict]:
    from src.worlds.toy.oracle import score_video

    scores = []
    for video, reference, prompt in zip(videos, truth, prompts):
        after = turned(prompt) if row.switch else prompt
        s = score_video(video[k:], after, segments=SEGMENTS)
        scores.append({
            "prompt": prompt, "after": after,
            "seam_error": seam_error(video, reference, prompt, k) if row.context else None,
            **{m: s[m] for m in ("fidelity", "direction_agreement", "object_found", "object_color_error",
                                 "shape_agreement", "motion")},
            "segments": {m: s["segments"][m] for m in ("fidelity", "direction_agreement", "object_found")},
        })
    return scores


def evaluate(students: dict[str, Path], blocks_list: list[int], num_prompts: int, noise_seeds: int,
             out: Path) -> None:
    from src.api import HiAR

    prompts, truth = evaluation_set(num_prompts, noise_seeds)
    (out / "scores").mkdir(parents=True, exist_ok=True)
    pipes = {}
    for blocks in blocks_list:
        k = 3 * blocks
        for row in (ROWS[i] for i in PRIORITY):
            path = out / "scores" / f"{row.key(blocks)}.json"
            if path.exists() or (row.student != "truth" and row.student not in students):
                continue
            start = time.perf_counter()
            if row.student == "truth":
                videos = truth
            else:
                if row.student not in pipes:
                    pipes[row.student] = HiAR.from_checkpoint(students[row.student], world="toy", device="cpu")
                videos = generate(pipes[row.student], row, prompts, truth, blocks)
            seconds = time.perf_counter() - start
            record = {"row": row.name, "blocks": blocks, "student": str(students.get(row.student, "")),
                      "order": row.order, "seconds": round(seconds, 1), "videos": score(videos, truth, prompts, row,
                                                                                        blocks, k)}
            atomic_write_text(path, json.dumps(record))
            print(f"=== {row.key(blocks)}: {len(prompts)} videos in {seconds:.0f} s", flush=True)


def summarise(record: dict) -> dict:
    videos = record["videos"]
    seam = [v["seam_error"] for v in videos if v["seam_error"] is not None]

    def mean(name):
        return float(np.mean([v[name] for v in videos]))

    def segment_mean(name):
        return np.mean([v["segments"][name] for v in videos], axis=0).tolist()

    return {
        "row": record["row"], "blocks": record["blocks"], "videos": len(videos), "order": record["order"],
        "student": record["student"], "seconds": record["seconds"],
        "seam_error_median": float(np.median(seam)) if seam else None,
        "seam_found": float(np.mean(np.isfinite(seam))) if seam else None,
        **{name: mean(name) for name in ("fidelity", "direction_agreement", "object_found", "object_color_error",
                                         "shape_agreement", "motion")},
        "direction_segments": segment_mean("direction_agreement"), "fidelity_segments": segment_mean("fidelity"),
    }


def fmt(value, digits=3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return f"{value:.{digits}f}"


def versus_scratch(record: dict, scratch: dict) -> list[float]:
    """20 s fidelity after the seam minus the same student's from scratch, paired over the same prompts and noise:
    [mean, standard error over videos]."""
    diff = np.array([a["fidelity"] - b["fidelity"] for a, b in zip(record["videos"], scratch["videos"], strict=True)])
    return [float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(len(diff)))]


def report(out: Path, dest: Path = HERE) -> dict:
    records = {path.stem: json.loads(path.read_text()) for path in sorted((out / "scores").glob("*.json"))}
    results = {key: summarise(record) for key, record in records.items()}
    for key, r in results.items():
        scratch = key.replace("_context_", "_scratch_").replace("_switch_", "_scratch_")
        r["fidelity_vs_scratch"] = (versus_scratch(records[key], records[scratch])
                                    if scratch != key and scratch in records else None)
    lines = ["| row | context blocks | videos | seam err px (median) | seam found | found | colour err | shape | "
             "direction, first 4 s | direction | fidelity | fidelity per ~4 s segment | Δ fidelity vs scratch |",
             "|" + "---|" * 13]
    order = {row.name: i for i, row in enumerate(ROWS)}
    for r in sorted(results.values(), key=lambda r: (r["blocks"], order.get(r["row"], 99))):
        lines.append(f"| {r['row']} | {r['blocks']} | {r['videos']} | {fmt(r['seam_error_median'], 2)} | "
                     f"{fmt(r['seam_found'])} | {fmt(r['object_found'])} | {fmt(r['object_color_error'])} | "
                     f"{fmt(r['shape_agreement'])} | {fmt(r['direction_segments'][0])} | "
                     f"{fmt(r['direction_agreement'])} | {fmt(r['fidelity'])} | "
                     f"{' / '.join(fmt(v, 2) for v in r['fidelity_segments'])} | "
                     + (f"{r['fidelity_vs_scratch'][0]:+.3f} ± {r['fidelity_vs_scratch'][1]:.3f} |"
                        if r["fidelity_vs_scratch"] else " |"))
    atomic_write_text(dest / "results.md", "\n".join(lines) + "\n")
    atomic_write_text(dest / "results.json", json.dumps(results, indent=1))
    print("\n".join(lines))
    return results


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.continuation.run", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["all", "evaluate", "report"], nargs="?", default="all")
    p.add_argument("--hiar", type=Path, help="the HiAR student (step-first trained)")
    p.add_argument("--self-forcing", type=Path, help="the Self-Forcing student (block-first trained)")
    p.add_argument("--blocks", type=int, nargs="+", default=[1], help="context lengths in blocks (3 frames each)")
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts")
    p.add_argument("--noise-seeds", type=int, default=2, help="videos per prompt")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    students = {name: path for name, path in (("hiar", a.hiar), ("self_forcing", a.self_forcing)) if path}
    for path in students.values():
        if not path.is_file():
            raise FileNotFoundError(f"student not found: {path}")
    if a.command in ("all", "evaluate"):
        evaluate(students, a.blocks, a.prompts, a.noise_seeds, a.out)
    if a.command in ("all", "report"):
        report(a.out, HERE if a.out == OUT else a.out)  # the table lands here only from the default outputs


if __name__ == "__main__":
    main()
