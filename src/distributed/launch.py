"""Per-rank entry point for torchrun and srun: `torchrun ... -m src.distributed.launch experiment=hiar_fkl strategy=ddp`.

Every rank runs `python -m src.train` with the given Hydra overrides, plus:

* one run directory shared by all ranks: `hydra.run.dir=$HIAR_RUN_DIR` (compute it once, before launching, on a
  filesystem every node sees; without it each rank resolves `${now:}` itself and may pick its own directory);
* on ranks > 0: no Hydra job log and no `.hydra/` folder (Lightning's loggers and checkpoints write on rank 0 only);
* under srun: RANK / WORLD_SIZE / LOCAL_RANK from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, which webdataset reads
  for its node split and per-rank resampling seeds.

``launch_local`` runs a function in a local process group of spawned processes (tests, experiments).

docs/distributed.md has the commands.
"""

from __future__ import annotations

import os
import runpy
import socket
import sys
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_worker(rank: int, world: int, port: int, backend: str, threads: int, fn: Callable, args: tuple):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def launch_local(world: int, fn: Callable, *args, backend: str = "gloo", threads: int = 1) -> None:
    """Run fn(rank, world, *args) in ``world`` spawned processes joined in a process group on 127.0.0.1 (a free
    port), each with ``threads`` intra-op threads. fn must be importable (a module-level function)."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    mp.start_processes(_local_worker, args=(world, free_port(), backend, threads, fn, args), nprocs=world,
                       start_method="spawn")


def main() -> None:
    os.environ.update(rank_environment(os.environ))
    sys.argv = [sys.argv[0], *rank_overrides(sys.argv[1:], os.environ)]
    runpy.run_module("src.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
