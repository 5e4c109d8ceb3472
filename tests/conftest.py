"""Suite-wide set-up: thread count, markers by folder (unit / integration / cli), shared fixtures (tests/helpers.py)."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
# `make test` runs two pytest-xdist workers on 2 cores: one thread each, and for the processes they start (more threads
# than cores slows every run many-fold); a plain `pytest` keeps up to 2
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))

from src.models.wan import WanConfig, WanDiT  # noqa: E402

from helpers import TINY, save_tiny_teacher  # noqa: E402

FOLDER_MARKERS = ("unit", "integration", "cli")


def pytest_collection_modifyitems(config, items):
    """Each test is marked by its folder: `pytest -m unit` is the fast loop (`make test-fast`)."""
    for item in items:
        folder = Path(str(item.fspath)).parent.name
        if folder in FOLDER_MARKERS:
            item.add_marker(getattr(pytest.mark, folder))


@pytest.fixture(autouse=True)
def keep_thread_count():
    """Tests that time or compare thread counts set their own; the next test gets the suite's count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_config() -> WanConfig:
    return WanConfig(**TINY)


@pytest.fixture
def tiny_model(tiny_config) -> WanDiT:
    torch.manual_seed(0)
    return WanDiT(tiny_config).eval()


@pytest.fixture
def teacher_file(tmp_path) -> Path:
    """A random tiny teacher (helpers.TINY_MODEL) as safetensors."""
    return save_tiny_teacher(tmp_path / "teacher.safetensors")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """The same tiny teacher, one per test module."""
    return str(save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "teacher.safetensors"))
