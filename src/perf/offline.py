"""Offline install for a GPU node without network: ``python src/perf/offline.py wheelhouse|install``.

Standard library and pip only, run as a script (``python -m src...`` would import ``src/__init__``, which needs
hydra: this runs before the project's dependencies exist).

``wheelhouse`` (on a machine that reaches the package index; ``make wheelhouse``): every wheel the project's core
dependencies (``pyproject.toml`` ``[project] dependencies``, torch excluded) need on a target Python and platform
(default CPython 3.12, manylinux x86_64), resolved as pip would resolve them there, into one folder with a
``manifest.json``. antlr4-python3-runtime 4.9.3 (hydra-core's parser runtime) exists only as an sdist, so its wheel
is built here first. Torch is replaced by an empty stand-in wheel during the resolution, so nothing of torch's own
(CUDA libraries, triton) enters the folder: the node brings its own torch. ``--provided`` names packages the node is
expected to have (default: numpy, transformers and its tokenizers, the largest); their wheels are left out to keep the folder
small (``--max-mib``, default 40), and the install says so if the node lacks one.

``install`` (on the node; ``make gpu-check WHEELHOUSE=...``): with ``--no-index`` (never the network), pip resolves
the same requirements against the interpreter that runs it, so every package the node already has in a version
inside the project's ranges is kept as it is; what is missing or out of range is installed from the wheelhouse into
a ``--target`` folder (put it first on PYTHONPATH). Nothing outside that folder changes. A second run with the
folder on PYTHONPATH finds everything satisfied and installs nothing.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ANTLR = "antlr4-python3-runtime==4.9.3"  # hydra-core 1.3's pin; published as an sdist only
DEFAULT_PROVIDED = ("numpy", "transformers", "tokenizers")
DEFAULT_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
MANIFEST = "manifest.json"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    return canonical(re.split(r"[\s<>=!~;\[(@]", req.strip(), maxsplit=1)[0])


def load_pyproject(root: Path = ROOT) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pip's own copy of tomli
        from pip._vendor import tomli as tomllib
    return tomllib.loads((root / "pyproject.toml").read_text())


def project_requirements(extras: list[str] | None = None, root: Path = ROOT) -> tuple[list[str], str]:
    """(the core requirements without torch, plus those of ``extras``; torch's requirement)."""
    project = load_pyproject(root)["project"]
    reqs = list(project["dependencies"])
    optional = project.get("optional-dependencies", {})
    for extra in extras or []:
        if extra not in optional:
            raise SystemExit(f"pyproject.toml has no extra {extra!r} (it has {sorted(optional)})")
        reqs += optional[extra]
    torch_req = next(r for r in reqs if requirement_name(r) == "torch")
    return [r for r in reqs if requirement_name(r) != "torch"], torch_req


def pip(python: str, *args: str, capture: bool = False) -> subprocess.CompletedProcess:
    cmd = [python, "-m", "pip", *args]
    done = subprocess.run(cmd, text=True, capture_output=True)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[:6])} ... failed ({done.returncode}):\n{done.stdout[-2000:]}"
                         f"{done.stderr[-4000:]}")
    if not capture and done.stdout.strip():
        print(done.stdout.strip())
    return done


def stand_in_wheel(folder: Path, name: str, version: str) -> Path:
    """An empty wheel that only tells pip ``name`` ``version`` is there (no dependencies, no files)."""
    dist = f"{name}-{version}.dist-info"
    files = {f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: src.perf.offline\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    path = folder / f"{name}-{version}-py3-none-any.whl"
    record = []
    with zipfile.ZipFile(path, "w") as wheel:
        for member, text in files.items():
            wheel.writestr(member, text)
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
            record.append(f"{member},sha256={digest},{len(text.encode())}")
        record.append(f"{dist}/RECORD,,")
        wheel.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return path


def target_args(python_version: str, platforms: list[str]) -> list[str]:
    abi = "cp" + python_version.replace(".", "")
    args = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp", "--abi", abi]
    for p in platforms:
        args += ["--platform", p]
    return args


def build_wheelhouse(out: Path, python_version: str, platforms: list[str], provided: list[str], extras: list[str],
                     torch_version: str, max_mib: float, python: str = sys.executable) -> dict:
    reqs, torch_req = project_requirements(extras)
    provided = [canonical(p) for p in provided]
    with tempfile.TemporaryDirectory() as tmp:
        local, staging = Path(tmp) / "local", Path(tmp) / "wheels"
        local.mkdir()
        pip(python, "wheel", "--quiet", "--no-deps", "--no-binary", ":all:", ANTLR, "-w", str(local))
        stand_in_wheel(local, "torch", f"{torch_version}+standin")
        report = Path(tmp) / "report.json"
        pip(python, "install", "--quiet", "--dry-run", "--ignore-installed", "--report", str(report), "--target",
            str(Path(tmp) / "target"), *target_args(python_version, platforms), "--find-links", str(local),
            *reqs, f"torch=={torch_version}+standin")
        resolved = {canonical(i["metadata"]["name"]): i["metadata"]["version"]
                    for i in json.loads(report.read_text())["install"]}
        resolved.pop("torch")
        wanted = {n: v for n, v in sorted(resolved.items()) if n not in provided}
        pip(python, "download", "--quiet", "--no-deps", *target_args(python_version, platforms), "--find-links",
            str(local), "-d", str(staging), *[f"{n}=={v}" for n, v in wanted.items()])
        wheels = sorted(staging.glob("*.whl"))
        total = sum(w.stat().st_size for w in wheels)
        manifest = {"python_version": python_version, "platforms": platforms, "requirements": reqs,
                    "torch_requirement": torch_req, "extras": extras, "provided_by_the_node": provided,
                    "left_out": {n: resolved[n] for n in provided if n in resolved}, "pins": wanted,
                    "wheels": {w.name: w.stat().st_size for w in wheels}, "total_bytes": total,
                    "built_with": f"python src/perf/offline.py wheelhouse (pip, {python})"}
        if total > max_mib * 2**20:
            largest = sorted(manifest["wheels"].items(), key=lambda kv: -kv[1])[:6]
            raise SystemExit(f"error: the wheelhouse would hold {total / 2**20:.1f} MiB > --max-mib {max_mib}; largest: "
                             + ", ".join(f"{n} {b / 2**20:.1f} MiB" for n, b in largest)
                             + "; name packages the node has with --provided")
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(staging, out)
    print(f"wheelhouse {out}: {len(wanted)} wheels, {total / 2**20:.1f} MiB for CPython {python_version} "
          f"({', '.join(platforms)}); left to the node: {', '.join(manifest['left_out']) or 'nothing'}")
    return manifest


def install(wheelhouse: Path, target: Path, extras: list[str], python: str = sys.executable) -> dict:
    """Resolve the project's requirements offline against this interpreter; install what is missing into target."""
    manifest_path = wheelhouse / MANIFEST
    if not manifest_path.exists():
        raise SystemExit(f"error: {manifest_path} not found: build the wheelhouse with `make wheelhouse` first")
    manifest = json.loads(manifest_path.read_text())
    reqs, torch_req = project_requirements(extras)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [python, "-m", "pip", "install", "--quiet", "--dry-run", "--no-index", "--find-links", str(wheelhouse),
               "--report", str(report), torch_req, *reqs]
        done = subprocess.run(cmd, text=True, capture_output=True)
        if done.returncode != 0:
            missing = re.findall(r"No matching distribution found for (\S+)", done.stderr)
            hint = ""
            if any(requirement_name(m) == "torch" for m in missing):
                hint = f"\nthis interpreter ({python}) needs torch ({torch_req}) installed: it is never in a wheelhouse"
            elif missing:
                hint = (f"\nthe wheelhouse left out {manifest.get('left_out')} as provided by the node; rebuild it "
                        "with WHEELHOUSE_PROVIDED= naming only what this node has")
            raise SystemExit(f"error: offline resolution failed (no network used):\n{done.stderr[-3000:]}{hint}")
        planned = [(i["metadata"]["name"], i["metadata"]["version"]) for i in json.loads(report.read_text())["install"]]
    if planned:
        target.mkdir(parents=True, exist_ok=True)
        pip(python, "install", "--quiet", "--no-index", "--find-links", str(wheelhouse), "--no-deps", "--upgrade",
            "--target", str(target), *[f"{n}=={v}" for n, v in planned])
    kept = {}
    for req in [torch_req, *reqs]:
        name = requirement_name(req)
        if all(canonical(n) != name for n, _ in planned):
            version = subprocess.run([python, "-c", f"import importlib.metadata as m; print(m.version({name!r}))"],
                                     text=True, capture_output=True).stdout.strip()
            kept[name] = version
    print(f"offline install into {target}: installed {len(planned)} "
          f"({', '.join(f'{n} {v}' for n, v in planned) or 'none'}); kept from this interpreter: "
          + ", ".join(f"{n} {v}" for n, v in kept.items()))
    result = {"installed": dict(planned), "kept": kept}
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python src/perf/offline.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("wheelhouse", help="download every non-torch wheel for a target Python (needs the index)")
    build.add_argument("--out", default="wheelhouse")
    build.add_argument("--python-version", default="3.12")
    build.add_argument("--platform", nargs="+", default=list(DEFAULT_PLATFORMS))
    build.add_argument("--provided", nargs="*", default=list(DEFAULT_PROVIDED),
                       help="packages the node has: their wheels are left out (default: %(default)s)")
    build.add_argument("--extras", nargs="*", default=[], help="pyproject extras to include too")
    build.add_argument("--torch-version", default="2.11.0",
                       help="the torch version the node has, for the resolution only (default %(default)s)")
    build.add_argument("--max-mib", type=float, default=40.0)
    node = sub.add_parser("install", help="install what this interpreter lacks from a wheelhouse (no network)")
    node.add_argument("--wheelhouse", default="wheelhouse")
    node.add_argument("--target", default=".gpu-check-deps")
    node.add_argument("--extras", nargs="*", default=[])
    a = parser.parse_args(argv)
    if a.command == "wheelhouse":
        build_wheelhouse(Path(a.out), a.python_version, a.platform, a.provided, a.extras, a.torch_version, a.max_mib)
    else:
        install(Path(a.wheelhouse), Path(a.target), a.extras)


if __name__ == "__main__":
    main()
