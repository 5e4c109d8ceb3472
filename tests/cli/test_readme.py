"""Every command in the README runs: the training commands on a tiny toy world (debug=fdr, nothing published), the
generation commands and the Python API snippet on a toy-sized student, each from a project root ($HIAR_ROOT) that is
not the checkout. `make demo` / `make test` are the demo and this suite; the SLURM sweep is composed (no cluster here)
and `evaluation.fetch_weights` is run with its downloads stubbed (tests/test_evaluation.py)."""

import re
import shlex

import pytest
import torch

from src.checkpoints import save_dit
from src.models.wan import WanConfig, WanDiT

from helpers import PAIRS, ROOT, STUDENT, cli, project_with_pairs

README = (ROOT / "README.md").read_text()
CHECKED_ELSEWHERE = {
    "make demo": "the demo itself", "make test": "this suite",
    "hydra/launcher=submitit_slurm": "test_workflow.py::test_slurm_launcher_config_composes",
    "python -m evaluation.fetch_weights": "test_evaluation.py::test_fetch_weights_fills_the_layout_the_measures_check",
}


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def commands() -> list[str]:
    """The README's shell commands, comments stripped."""
    out = []
    for block in blocks("bash"):
        for line in block.splitlines():
            command = line.split("  #")[0].strip()
            if command and not command.startswith("#"):
                out.append(command)
    return out


def test_every_readme_command_is_run_or_named_here():
    handled = ("python -m src.train", "python -m src.generate")
    unrun = [c for c in commands() if not c.startswith(handled) and not any(k in c for k in CHECKED_ELSEWHERE)]
    assert unrun == []
    assert len(blocks("python")) == 3  # the DiT snippet (tests/test_model.py covers its calls), the API snippets


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme_project")
    tiny = project_with_pairs(root, root)
    cli(["-m", "src.train", "experiment=ode_init", *tiny], root, root)
    # a toy-sized student where the README's generation commands look for it
    student = root / "artifacts/toy/hiar_fkl/student.safetensors"
    torch.manual_seed(1)
    save_dit(WanDiT(WanConfig(dim=128, ffn_dim=512, freq_dim=256, num_heads=4, num_layers=4, in_dim=12, out_dim=12,
                              text_len=16, text_dim=64)), student)
    return root, tiny


def test_readme_training_commands_run(project):
    root, tiny = project
    before = sorted(p.name for p in (root / "artifacts/toy").iterdir())
    train = [c for c in commands() if c.startswith("python -m src.train") and "submitit" not in c]
    assert len(train) >= 8

    def start(command: str):
        args = shlex.split(command)[1:]
        extra = [*tiny, *(STUDENT if "ode_" not in command and "teacher" not in command else []),
                 *(PAIRS if "ode_pairs" in command else [])]
        if "teacher_toy" in command:
            extra = [*tiny, "data.source=procedural", "data.num_frames=6", "data.batch_size=2", "task.clip_frames=null",
                     "data.warmup_batches=0", "data.warmup_frames=null", "task.init_weights=null"]
        if "debug=" not in command:
            extra.append("debug=fdr")
        return cli([*args, *extra], root, root, wait=False)

    # two at a time: the debug runs read only published artifacts and each owns its run folder (start-up dominates)
    for pair in (train[i:i + 2] for i in range(0, len(train), 2)):
        running = [(command, start(command)) for command in pair]
        for command, proc in running:
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, f"{command}\n{err[-3000:]}"
    assert sorted(p.name for p in (root / "artifacts/toy").iterdir()) == before  # debug runs never publish


def test_readme_generation_commands_and_api_snippet(project, monkeypatch):
    root, _ = project
    for command in [c for c in commands() if c.startswith("python -m src.generate")]:
        cli(shlex.split(command)[1:], root, root)
    runs = sorted((root / "logs/generate/runs").glob("*/settings.json"))
    assert len(runs) == 3 and len(list((root / "outputs/left").glob("*.mp4"))) == 1  # the third extends outputs/left
    monkeypatch.chdir(root)
    snippets = [b for b in blocks("python") if "pipe." in b]  # the API snippet, then its continuation
    assert len(snippets) == 2 and "from src.api import HiAR" in snippets[0]
    namespace = {}
    for snippet in snippets:
        exec(snippet.replace("print(", "(lambda *a: None)("), namespace)
    assert len(list((root / "outputs/api").glob("*.mp4"))) == 1
    assert namespace["more"].shape == namespace["longer"].shape == (1, 21, 3, 16, 16)
