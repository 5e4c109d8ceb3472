import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(min(2, os.cpu_count() or 1))

from src.models.wan import WanConfig, WanDiT  # noqa: E402


@pytest.fixture(autouse=True)
def keep_thread_count():
    """Tests that time or compare thread counts set their own; the next test gets the suite's count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


TINY = dict(dim=64, ffn_dim=128, freq_dim=32, num_heads=4, num_layers=2, in_dim=4, out_dim=4, text_len=8, text_dim=16)


@pytest.fixture
def tiny_config() -> WanConfig:
    return WanConfig(**TINY)


@pytest.fixture
def tiny_model(tiny_config) -> WanDiT:
    torch.manual_seed(0)
    return WanDiT(tiny_config).eval()
