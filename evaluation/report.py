"""Per-method aggregation and the report: report.json, report.md and PNG plots of the per-segment curves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from evaluation.drift import DEFAULT_WEIGHTS, MOTION_PROXY_NAME, SLOPE_SCALE, mean_or_none  # noqa: E402
from evaluation.models import DRIFT_MEASURES  # noqa: E402

DRIFT_DEFINITION = {
    "segments": "5 near-equal consecutive parts of each video",
    "slope": "least-squares slope against segment centres (i + 0.5) / n: fitted change from start to end of video",
    "normalisation": {
        m: ("divide by mean over segments" if s is None else f"divide by {s}") for m, s in SLOPE_SCALE.items()
    },
    "weights": DEFAULT_WEIGHTS,
    "score": "sum_m w_m |normalised slope_m| / sum_m w_m over available measures; lower is better",
    MOTION_PROXY_NAME: "mean |luma difference| of consecutive frames in [0, 1]; a proxy, not VBench dynamic_degree",
}


def jsonable(value):
    """Tensors / numpy scalars inside a result (e.g. the toy oracle's) -> plain Python for JSON and loggers."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return value.tolist()
    return value


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def summarise_method(videos: list[dict], oracle: dict | None = None, vbench: dict | None = None) -> dict:
    """Means over a method's videos of every drift number, with the per-segment mean curves."""
    measures = [m for m in DRIFT_MEASURES if any(m in v["segments"] for v in videos)]
    segments = {}
    for m in measures:
        curves = [v["segments"][m] for v in videos if m in v["segments"]]
        segments[m] = [sum(c[i] for c in curves) / len(curves) for i in range(len(curves[0]))]
    quality = [v["imaging_quality_first_last"] for v in videos if v["imaging_quality_first_last"] is not None]
    summary = {
        "videos": len(videos),
        "drift": mean_or_none([v["drift"] for v in videos]),
        "drift_measures": sorted({m for v in videos for m in v["drift_measures"]}, key=DRIFT_MEASURES.index),
        "slopes": {m: mean_or_none([v["slopes"].get(m) for v in videos]) for m in measures},
        "normalised_slopes": {m: mean_or_none([v["normalised_slopes"].get(m) for v in videos]) for m in measures},
        "delta_imaging_quality_pct": mean_or_none([q["delta_pct"] for q in quality]) if quality else None,
        MOTION_PROXY_NAME: mean_or_none([v[MOTION_PROXY_NAME] for v in videos]),
    }
    if vbench is not None:
        summary["vbench"] = {dim: r["score"] for dim, r in vbench.items()}
    if oracle is not None:
        summary["oracle"] = oracle
    return {"summary": summary, "segments": segments, "videos": videos}


COMPARED_MEASURES = ("fidelity", "direction_agreement", "motion")


def paired_comparison(baseline: dict, method: dict, measures=COMPARED_MEASURES) -> dict:
    """`method` minus `baseline` (two summarise_method results) on the videos both have (same file name: the same
    prompt and noise), per oracle segment and over the whole video (the oracle's score of all its frames), each as the
    mean and standard error of the paired differences. The pairing removes the prompt-to-prompt spread both models
    share."""
    import numpy as np

    from src.worlds.toy.oracle import standard_error

    ours = {v["name"]: v["oracle"] for v in method["videos"] if "oracle" in v}
    theirs = {v["name"]: v["oracle"] for v in baseline["videos"] if "oracle" in v}
    names = sorted(set(ours) & set(theirs))
    if not names:
        raise ValueError("the compared methods share no scored video (same file names: same prompts and seeds)")
    result = {"videos": len(names), "measures": {}}
    for m in measures:
        diff = (np.array([ours[n]["segments"][m] for n in names])
                - np.array([theirs[n]["segments"][m] for n in names]))  # [videos, segments]
        whole = np.array([ours[n][m] for n in names]) - np.array([theirs[n][m] for n in names])
        result["measures"][m] = {
            "per_segment": {"mean": diff.mean(axis=0).tolist(), "se": standard_error(diff).tolist()},
            "video": {"mean": float(whole.mean()), "se": float(standard_error(whole))},
        }
    return result


def _pm(mean: float, se: float) -> str:
    return f"{mean:+.3f} ± {se:.3f}"


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if _numeric(value):
        return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _oracle_scalars(oracle: dict) -> dict[str, float]:
    return {k: v for k, v in oracle.items() if _numeric(v) or isinstance(v, bool)}


def _oracle_curve(oracle: dict) -> list[float] | None:
    seg = oracle.get("segments")
    if isinstance(seg, list) and seg and all(_numeric(v) for v in seg):
        return seg
    if isinstance(seg, dict) and isinstance(seg.get("fidelity"), list) and all(_numeric(v) for v in seg["fidelity"]):
        return seg["fidelity"]
    return None


def segment_figure(segments_by_method: dict[str, dict[str, list[float]]], title: str = "per-segment drift measures",
                   duration_s: float | None = None):
    """One subplot per measure, one line per method; with the videos' duration, each segment's value is plotted at
    its middle in seconds. Returns the matplotlib Figure (caller closes it)."""
    names = [m for m in [*DRIFT_MEASURES, "oracle_fidelity"] if any(m in s for s in segments_by_method.values())]
    if not names:
        raise ValueError("no per-segment values to plot")
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for method, segs in segments_by_method.items():
            if name in segs:
                values = segs[name]
                x = [(i + 0.5) * duration_s / len(values) for i in range(len(values))] if duration_s \
                    else range(1, len(values) + 1)
                ax.plot(x, values, marker="o", label=method)
        ax.set_title(name)
        ax.set_xlabel("time in the video (s)" if duration_s else "segment")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def write_report(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """results: {"methods": {name: summarise_method(...)}, "unavailable": {...}, "vbench_status": str, "config": {}}.

    Writes report.json, report.md and plots/segments.png (+ one PNG per measure); returns their paths.
    """
    out = Path(out_dir)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    methods = results["methods"]
    if not methods:
        raise ValueError("the report needs at least one method")
    results = {**results, "drift_definition": DRIFT_DEFINITION}

    curves = {}
    for method, r in methods.items():
        curves[method] = dict(r["segments"])
        oracle_curve = _oracle_curve(r["summary"].get("oracle") or {})
        if oracle_curve is not None:
            curves[method]["oracle_fidelity"] = oracle_curve
    paths = {"json": out / "report.json", "md": out / "report.md", "segments_png": plots / "segments.png"}
    durations = [v["duration_s"] for r in methods.values() for v in r.get("videos", []) if v.get("duration_s")]
    duration = sum(durations) / len(durations) if durations else None
    fig = segment_figure(curves, duration_s=duration)
    fig.savefig(paths["segments_png"], dpi=110)
    plt.close(fig)
    for name in sorted({n for c in curves.values() for n in c}):
        fig = segment_figure({m: {name: c[name]} for m, c in curves.items() if name in c}, title=name,
                             duration_s=duration)
        paths[f"{name}_png"] = plots / f"{name}.png"
        fig.savefig(paths[f"{name}_png"], dpi=110)
        plt.close(fig)

    paths["json"].write_text(json.dumps(results, indent=2, default=str))
    paths["md"].write_text("\n".join(_markdown(results, paths, out)))
    return paths


def _markdown(results: dict, paths: dict[str, Path], out: Path) -> list[str]:
    methods = results["methods"]
    lines = ["# Evaluation report", ""]
    lines += [
        "Drift (HiAR §9, our normalisation): mean |normalised per-segment slope| over the available measures, equal "
        "weights; lower is better. Low motion flatters drift: read it beside the dynamic degree / motion proxy. "
        "Delta imaging quality (Rolling Forcing): |MUSIQ first 5 s - last 5 s| in percentage points.",
        "",
        "## Drift summary",
        "",
    ]
    rows = []
    for method, r in methods.items():
        s = r["summary"]
        dyn = (s.get("vbench") or {}).get("dynamic_degree")
        rows.append([
            method, s["videos"], s["drift"], ", ".join(s["drift_measures"]) or "none",
            s["delta_imaging_quality_pct"] if s["delta_imaging_quality_pct"] is not None else "unavailable (no MUSIQ)",
            dyn if dyn is not None else "unavailable (no VBench run)", s[MOTION_PROXY_NAME],
        ])
    lines += _table(
        ["method", "videos", "drift", "measures", "delta imaging quality (pp)", "dynamic degree (VBench)",
         f"{MOTION_PROXY_NAME} (proxy)"],
        rows,
    )
    measures = [m for m in DRIFT_MEASURES if any(m in r["segments"] for r in methods.values())]
    lines += ["## Slopes per measure (change from start to end of video)", ""]
    slope_rows = [[m, *[r["summary"]["slopes"].get(x) for x in measures]] for m, r in methods.items()]
    lines += _table(["method", *measures], slope_rows)
    lines += ["## Per-segment means", ""]
    for name in measures:
        n = max(len(r["segments"].get(name, [])) for r in methods.values())
        lines += [f"**{name}**", ""]
        lines += _table(
            ["method", *[f"seg {i + 1}" for i in range(n)]],
            [[m, *r["segments"][name]] for m, r in methods.items() if name in r["segments"]],
        )
    lines += [f"![per-segment curves]({paths['segments_png'].relative_to(out)})", ""]

    vbench = {m: r["summary"]["vbench"] for m, r in methods.items() if "vbench" in r["summary"]}
    lines += ["## VBench (custom_input dimensions)", ""]
    if vbench:
        dims = sorted({d for v in vbench.values() for d in v})
        lines += _table(["method", *dims], [[m, *[v.get(d) for d in dims]] for m, v in vbench.items()])
    lines += [f"Status: {results.get('vbench_status', 'not requested')}", ""]

    oracle = {m: _oracle_scalars(r["summary"]["oracle"]) for m, r in methods.items() if "oracle" in r["summary"]}
    if oracle:
        keys = sorted({k for v in oracle.values() for k in v})
        lines += ["## Toy-world oracle", ""]
        lines += _table(["method", *keys], [[m, *[v.get(k) for k in keys]] for m, v in oracle.items()])
        lines += ["### Oracle per segment (drift: quality over time; speed and direction: motion over time)", ""]
        rows = []
        for method, r in methods.items():
            per_segment = (r["summary"].get("oracle") or {}).get("segments")
            if isinstance(per_segment, dict):
                rows += [[method, name, *values] for name, values in per_segment.items()]
        n = max((len(row) - 2 for row in rows), default=0)
        lines += _table(["method", "measure", *[f"seg {i + 1}" for i in range(n)]], rows)

    for comparison in results.get("comparisons") or []:
        lines += [f"## Paired: {comparison['method']} minus {comparison['baseline']} "
                  f"({comparison['videos']} videos, same prompts and noise; mean ± standard error)", ""]
        n = len(next(iter(comparison["measures"].values()))["per_segment"]["mean"])
        rows = [[m, _pm(d["video"]["mean"], d["video"]["se"]),
                 *[_pm(a, b) for a, b in zip(d["per_segment"]["mean"], d["per_segment"]["se"])]]
                for m, d in comparison["measures"].items()]
        lines += _table(["oracle measure", "whole video", *[f"seg {i + 1}" for i in range(n)]], rows)

    unavailable = results.get("unavailable") or {}
    if unavailable:
        lines += ["## Unavailable measures", ""]
        lines += [f"- **{name}**: {reason}" for name, reason in unavailable.items()] + [""]

    lines += ["## Per video", ""]
    rows = []
    for method, r in methods.items():
        for v in r["videos"]:
            q = v["imaging_quality_first_last"]
            rows.append([method, v["name"], v["prompt"], v["num_frames"], v["drift"],
                         q["delta_pct"] if q else None, v[MOTION_PROXY_NAME]])
    lines += _table(["method", "video", "prompt", "frames", "drift", "delta IQ (pp)", "motion proxy"], rows)
    return lines
