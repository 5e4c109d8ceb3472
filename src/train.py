"""Training entry point: `python -m src.train experiment=hiar_fkl` (any stage is an experiment config).

Thin on purpose: compose, instantiate the datamodule, the LightningModule, callbacks, loggers and trainer, fit.
"""

from __future__ import annotations

import logging

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from src.training.reliability import AtomicCheckpointIO, validate_config

log = logging.getLogger(__name__)


def instantiate_all(node: DictConfig | None) -> list:
    """Instantiate every entry of a group that has a `_target_` (callbacks, loggers)."""
    if not node:
        return []
    return [hydra.utils.instantiate(c) for c in node.values() if isinstance(c, DictConfig) and "_target_" in c]


def train(cfg: DictConfig) -> dict[str, float]:
    validate_config(OmegaConf.to_container(cfg, resolve=True))  # types, ranges, outputs, input files: before any work
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data) if cfg.get("data") else None
    module = hydra.utils.instantiate(cfg.task, _recursive_=False)
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=instantiate_all(cfg.get("callbacks")),
        logger=instantiate_all(cfg.get("logger")) or False,
        **({"strategy": hydra.utils.instantiate(cfg.strategy)} if cfg.get("strategy") else {}),
        plugins=[AtomicCheckpointIO()],  # atomic checksummed finite saves, weights_only loads
    )
    log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.get("mode", "fit") == "predict":  # generation stages (ODE pairs) write through prediction callbacks
        trainer.predict(module, datamodule=datamodule, return_predictions=False)
    else:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    monitored = cfg.get("optimized_metric")
    return metrics.get(monitored) if monitored else None


if __name__ == "__main__":
    main()
