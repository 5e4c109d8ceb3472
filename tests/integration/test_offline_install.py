"""The GPU check's offline install (src/perf/offline.py): a wheelhouse holds every non-torch requirement, and a node
interpreter that has only torch installs the rest with --no-index into a folder and imports the check.

The wheelhouse here is this machine's own (its Python and platform, nothing left to the node), built once from the
package index and cached under .cache/ (git-ignored); the test skips only when the index cannot be reached."""

import hashlib
import importlib.metadata as metadata
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

from src.perf import offline

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "src" / "perf" / "offline.py"
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


def index_reachable(tmp: Path) -> bool:
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(tmp),
                           "braceexpand==0.1.7"], capture_output=True, text=True, timeout=120)
    return done.returncode == 0


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    reqs, _ = offline.project_requirements()
    key = hashlib.sha256(json.dumps([reqs, PYTHON_VERSION, sysconfig.get_platform()]).encode()).hexdigest()[:12]
    folder = ROOT / ".cache" / "wheelhouse-test" / key
    if (folder / offline.MANIFEST).exists():
        return folder
    if not index_reachable(tmp_path_factory.mktemp("probe")):
        pytest.skip("the package index is unreachable: the wheelhouse cannot be built (no cached one in .cache/)")
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    offline.build_wheelhouse(folder, PYTHON_VERSION, platforms, provided=[], extras=[],
                             torch_version=metadata.version("torch").split("+")[0], max_mib=400)
    return folder


def distribution_closure(name: str) -> set[str]:
    """torch and the distributions it requires here (markers evaluated, extras ignored)."""
    env, seen, todo = default_environment(), set(), [name]
    while todo:
        dist = metadata.distribution(todo.pop())
        if dist.metadata["Name"].lower() in seen:
            continue
        seen.add(dist.metadata["Name"].lower())
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({**env, "extra": ""}):
                todo.append(req.name)
    return seen


def torch_only_interpreter(folder: Path) -> Path:
    """A fresh venv whose only packages (besides pip) are torch and its requirements, linked from this interpreter's
    site-packages: the GPU node of the plan, minus everything but torch."""
    base = Path(sys.base_prefix) / "bin" / f"python{PYTHON_VERSION}"
    subprocess.run([str(base), "-m", "venv", str(folder / "venv")], check=True, capture_output=True)
    python = folder / "venv" / "bin" / "python"
    # the venv's own setuptools (ensurepip's) would shadow the one torch requires
    subprocess.run([str(python), "-m", "pip", "uninstall", "--quiet", "-y", "setuptools"], capture_output=True)
    node_site = folder / "node-site"
    node_site.mkdir()
    for name in distribution_closure("torch"):
        dist = metadata.distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            source = Path(dist.locate_file(top))
            if source.exists() and not (node_site / top).exists():
                (node_site / top).symlink_to(source)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "node_torch.pth").write_text(str(node_site) + "\n")
    return python


def test_offline_install_imports_the_check(wheelhouse, tmp_path):
    manifest = json.loads((wheelhouse / offline.MANIFEST).read_text())
    assert any(name.startswith("antlr4_python3_runtime-4.9.3") for name in manifest["wheels"])  # built from sdist
    assert not any(name.startswith("torch-") for name in manifest["wheels"])
    python = torch_only_interpreter(tmp_path)
    target = tmp_path / "deps"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHONPATH"))}
    env.update(PYTHONPATH=str(target), PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1")  # nothing but the wheelhouse

    def install():
        return subprocess.run([str(python), str(SCRIPT), "install", "--wheelhouse", str(wheelhouse), "--target",
                               str(target)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    first = install()
    assert first.returncode == 0, first.stderr[-3000:]
    installed = json.loads(first.stdout.strip().splitlines()[-1])
    assert {"hydra-core", "omegaconf", "antlr4-python3-runtime", "diffusers", "webdataset", "lightning"} <= {
        offline.canonical(n) for n in installed["installed"]}
    assert "torch" in installed["kept"]  # the node's own torch is used as it is
    probe = ("import src.perf.check, src.perf.estimate, src.perf.gpu, src.train, diffusers, webdataset, torch; "
             "print(torch.__file__, src.perf.check.__file__)")
    done = subprocess.run([str(python), "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert str(ROOT / "src" / "perf" / "check.py") in done.stdout
    again = install()  # everything is satisfied now: nothing is installed twice
    assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1])["installed"] == {}
