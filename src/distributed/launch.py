"""Per-rank entry point for torchrun and srun: `torchrun ... -m src.distributed.launch experiment=hiar_fkl strategy=ddp`.

Every rank runs `python -m src.train` with the given Hydra overrides, plus:

* one run directory shared by all ranks: `hydra.run.dir=$HIAR_RUN_DIR` (compute it once, before launching, on a
  filesystem every node sees; without it each rank resolves `${now:}` itself and may pick its own directory);
* on ranks > 0: no Hydra job log and no `.hydra/` folder (Lightning's loggers and checkpoints write on rank 0 only);
* under srun: RANK / WORLD_SIZE / LOCAL_RANK from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, which webdataset reads
  for its node split and per-rank resampling seeds.

docs/distributed.md has the commands.
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Mapping

SLURM_TO_TORCH = {"SLURM_PROCID": "RANK", "SLURM_NTASKS": "WORLD_SIZE", "SLURM_LOCALID": "LOCAL_RANK"}


def rank_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """RANK / WORLD_SIZE / LOCAL_RANK derived from SLURM's variables where torchrun has not set them."""
    return {torch_key: environ[slurm_key] for slurm_key, torch_key in SLURM_TO_TORCH.items()
            if torch_key not in environ and slurm_key in environ}


def rank_overrides(args: list[str], environ: Mapping[str, str]) -> list[str]:
    """The Hydra overrides of this rank: the given ones, the shared run directory, and silence on ranks > 0."""
    if int(environ.get("WORLD_SIZE", "1")) > 1 and any(a in ("-m", "--multirun") for a in args):
        raise SystemExit("src.distributed.launch: --multirun cannot run under torchrun/srun (each rank would run the "
                         "whole sweep); sweep with hydra/launcher=submitit_slurm instead (docs/distributed.md)")
    out = list(args)
    if environ.get("HIAR_RUN_DIR"):
        out.append(f"hydra.run.dir={environ['HIAR_RUN_DIR']}")
    if int(environ.get("RANK", "0")) > 0:
        out += ["hydra/job_logging=disabled", "hydra/hydra_logging=disabled", "hydra.output_subdir=null"]
    return out


def main() -> None:
    os.environ.update(rank_environment(os.environ))
    sys.argv = [sys.argv[0], *rank_overrides(sys.argv[1:], os.environ)]
    runpy.run_module("src.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
