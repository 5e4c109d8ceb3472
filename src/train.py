"""Training entry point: `python -m src.train experiment=hiar_fkl` (any stage is an experiment config).

Thin on purpose: compose, check the stage's inputs against their manifests, instantiate the datamodule, the
LightningModule, callbacks, loggers and trainer, fit; export (a step of its own: also after a resume with nothing left to
train); then write the export's manifest and publish it (src/artifacts.py).
The resolved config is saved as <run>/config.yaml, not printed.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from src import artifacts
from src.io import atomic_write_text
from src.schema import check_train, refusals
from src.training.checkpoint_io import AtomicCheckpointIO, resume_path

log = logging.getLogger(__name__)
CONF = Path(__file__).resolve().parents[1] / "conf"
artifacts.share_run_id_with_sweep_jobs(sys.argv[1:])


def instantiate_all(node: DictConfig | None) -> list:
    """Instantiate every entry of a group that has a `_target_` (callbacks, loggers)."""
    if not node:
        return []
    return [hydra.utils.instantiate(c) for c in node.values() if isinstance(c, DictConfig) and "_target_" in c]


def experiments() -> list[str]:
    return sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def quiet_lightning() -> None:
    """Keep Lightning's start-up chatter (accelerator lines, cloud tips) and the notice about the frozen teacher being
    in eval mode (intended: it is frozen) out of the console."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
    warnings.filterwarnings("ignore", message=r".*does not have many workers which may be a bottleneck")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")


def short_run_logging(trainer: DictConfig) -> dict:
    """A run shorter than trainer.log_every_n_steps logs every iteration, so that any run writes metrics.csv."""
    every, max_steps = trainer.get("log_every_n_steps"), trainer.get("max_steps")
    return {"log_every_n_steps": 1} if every and max_steps and 0 < max_steps < every else {}


def why_not_publish(cfg: DictConfig) -> str | None:
    """None when the stage's export may be published; else why not."""
    if not cfg.get("publish", True):
        return "publish=false"
    if cfg.trainer.get("fast_dev_run"):
        return "fast_dev_run"
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return "a sweep job (publish one by re-running it alone)"
    return None


def check(cfg: DictConfig) -> dict[str, dict]:
    """Every check before any work (src/schema.py); returns the manifests of the stage's inputs."""
    if cfg.get("ckpt_path"):
        cfg.ckpt_path = resume_path(cfg.ckpt_path)  # a last.ckpt not written yet: the newest periodic checkpoint
    check_train(cfg, experiments())
    return artifacts.check_inputs(cfg)  # a stale input is refused here


def make_trainer(cfg: DictConfig, **overrides) -> L.Trainer:
    """The Trainer ``cfg`` describes: its callbacks and loggers, its strategy (which applies conf/parallelize to every
    DiT) and the atomic checkpoint IO; ``overrides`` replace any Trainer argument (a benchmark's own callbacks)."""
    kwargs = {
        **short_run_logging(cfg.trainer),
        "callbacks": instantiate_all(cfg.get("callbacks")),
        "logger": instantiate_all(cfg.get("logger")) or False,
        **({"strategy": hydra.utils.instantiate(cfg.strategy)} if cfg.get("strategy") else {}),
        "plugins": [AtomicCheckpointIO()],  # atomic checksummed finite saves, weights_only loads
    }
    return hydra.utils.instantiate(cfg.trainer, **{**kwargs, **overrides})


def train(cfg: DictConfig, used: dict[str, dict] | None = None) -> dict[str, float]:
    """Fit (or predict) the stage `cfg` runs; `used`: its inputs' manifests when `check` already ran."""
    used = check(cfg) if used is None else used
    stage = artifacts.stage_of(cfg)
    output_dir = Path(str(cfg.paths.output_dir))
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    log.info("run folder: %s (resolved config in config.yaml)", output_dir)

    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = hydra.utils.instantiate(cfg.data) if cfg.get("data") else None
    module = hydra.utils.instantiate(cfg.task, _recursive_=False)
    trainer = make_trainer(cfg)
    if cfg.get("mode", "fit") == "predict":  # generation stages (ODE pairs) write through prediction callbacks
        trainer.predict(module, datamodule=datamodule, return_predictions=False)
    else:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    # the export is a step of its own: a resume from a checkpoint already at max_steps skips the fit loop and its
    # on_train_end, yet holds that checkpoint's weights (every rank: gathering sharded weights is collective)
    exported = module.export() if hasattr(module, "export") else []

    if stage is not None and trainer.is_global_zero:
        export_dir = Path(str(cfg.paths.export_dir))
        manifest = artifacts.write_manifest(export_dir, cfg, stage, used, required=exported)
        reason = why_not_publish(cfg) if manifest["files"] else "nothing was exported"
        if reason is None:
            target = artifacts.publish(export_dir, cfg.paths.artifacts_dir, stage.name)
            log.info("published %s %s -> %s", stage.name, manifest["id"], target)
        else:
            log.info("%s %s kept in %s, not published: %s", stage.name, manifest["id"], export_dir, reason)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@hydra.main(version_base="1.3", config_path=str(CONF), config_name="train")
def main(cfg: DictConfig) -> float | None:
    quiet_lightning()
    with refusals(cfg):  # a refused command prints one line and leaves no run folder
        used = check(cfg)
    try:
        metrics = train(cfg, used)
    except artifacts.ExportError as err:  # the run folder stays: its checkpoints finish the export on resume
        raise SystemExit(f"error: {err}") from None
    monitored = cfg.get("optimized_metric")
    return metrics.get(monitored) if monitored else None


if __name__ == "__main__":
    main()
