"""parallelize_dit (src/distributed/parallelize.py): what it applies to a DiT from outside, in which order, once; and
that every strategy applies it with the run's `parallelize` settings."""

from dataclasses import asdict

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from src.distributed.parallelize import ParallelizeConfig, applied_settings, is_checkpointed, parallelize_dit
from src.distributed.strategies import (
    DeepSpeedEnginesStrategy,
    FSDP2Strategy,
    GradSyncDDPStrategy,
    SingleDeviceDiTStrategy,
)
from src.models.wan import WanDiT

from helpers import CONF


def _inputs(cfg, frames=3):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, frames, cfg.in_dim, 4, 4, generator=g), torch.full((1,), 500.0),
            torch.randn(1, cfg.text_len, cfg.text_dim, generator=g))


def test_checkpointing_then_compile_then_shard_once(tiny_config):
    model = WanDiT(tiny_config)
    seen = []

    def shard(m):  # the strategy's wrapping comes last: it sees the checkpointed blocks
        seen.append(is_checkpointed(m))
        return "engine"

    cfg = ParallelizeConfig(activation_checkpointing=True)
    assert applied_settings(model) is None
    assert parallelize_dit(model, cfg, shard) == "engine" and seen == [True]
    assert applied_settings(model) == asdict(cfg)
    assert parallelize_dit(model, cfg) is model and is_checkpointed(model)  # a second setup: not checkpointed twice
    assert model.blocks[0].forward.args[0].__self__ is model.blocks[0]
    with pytest.raises(ValueError, match="parallelized with"):
        parallelize_dit(model, ParallelizeConfig(activation_checkpointing=False))
    assert set(model.state_dict()) == set(WanDiT(tiny_config).state_dict())  # names unchanged: blocks stay blocks


def test_frozen_models_are_not_checkpointed_and_defaults_apply_nothing(tiny_config):
    frozen = WanDiT(tiny_config).requires_grad_(False)
    parallelize_dit(frozen, ParallelizeConfig(activation_checkpointing=True))
    plain = parallelize_dit(WanDiT(tiny_config), ParallelizeConfig())
    assert not is_checkpointed(frozen) and not is_checkpointed(plain)
    assert all("forward" not in vars(b) and "pre_attention" not in vars(b) for b in plain.blocks)


def test_checkpointed_model_refuses_cache_writes_with_grad(tiny_config):
    model = parallelize_dit(WanDiT(tiny_config), ParallelizeConfig(activation_checkpointing=True))
    x, t, ctx = _inputs(tiny_config)
    with pytest.raises(ValueError, match="cache writes run without grad"):
        model(x, t, ctx, cache=model.new_cache(), write_cache=True)
    with torch.no_grad():  # without grad the same write is fine
        model(x, t, ctx, cache=model.new_cache(), write_cache=True)


class _OneDiT(L.LightningModule):
    def __init__(self, cfg):
        super().__init__()
        self.model = WanDiT(cfg)
        self.frozen = WanDiT(cfg).requires_grad_(False)

    def training_step(self, batch, batch_idx):
        return self.model(*batch).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.0)


def test_the_default_strategy_parallelizes_every_dit(tiny_config):
    module = _OneDiT(tiny_config)
    strategy = SingleDeviceDiTStrategy(parallelize={"activation_checkpointing": True})
    trainer = L.Trainer(accelerator="cpu", strategy=strategy, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader([_inputs(tiny_config)], batch_size=None))
    assert strategy.root_device == torch.device("cpu")
    assert is_checkpointed(module.model) and not is_checkpointed(module.frozen)


def test_the_one_device_strategy_refuses_several_devices():
    strategy = L.Trainer(accelerator="cpu", devices=2, strategy=SingleDeviceDiTStrategy()).strategy
    with pytest.raises(ValueError, match="runs on one device"):
        _ = strategy.root_device


@pytest.mark.parametrize("overrides,cls", [([], SingleDeviceDiTStrategy), (["trainer=ddp"], GradSyncDDPStrategy),
                                            (["strategy=ddp"], GradSyncDDPStrategy),
                                            (["strategy=fsdp2"], FSDP2Strategy),
                                            (["strategy=deepspeed_zero3_offload"], DeepSpeedEnginesStrategy)])
def test_every_strategy_gets_the_parallelize_settings(overrides, cls):
    """The world's activation_checkpointing (on in the Wan world) and parallelize.compile reach every strategy."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=hiar_fkl", "world=wan2.1_1.3b", "parallelize.compile=true",
                                          *overrides])
    node = cfg.strategy if cfg.get("strategy") else cfg.trainer.strategy
    if cls is DeepSpeedEnginesStrategy:
        pytest.importorskip("deepspeed")
    strategy = instantiate(node)
    assert type(strategy) is cls
    assert strategy.parallelize == ParallelizeConfig(activation_checkpointing=True, compile=True)
    assert "tensor_parallel_size" not in node
