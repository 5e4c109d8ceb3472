"""Config values that follow from the launch (registered as OmegaConf resolvers when `src` is imported).

* the global batch (`world.training.batch_size`, the official `total_batch_size`) split over devices x nodes into a
  per-rank batch, and that into micro-batches of `world.training.micro_batch_size` (gradient accumulation);
* the dtype the frozen teacher is stored in under a trainer precision (bf16 under the bf16 policy).
"""

from __future__ import annotations

from omegaconf import OmegaConf

BF16_PRECISIONS = ("bf16-mixed", "bf16-true", "bf16")


def device_count(devices) -> int:
    """Lightning's `trainer.devices` (an int, a list of indices, "auto" or -1) -> a number of devices per node."""
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    if devices in ("auto", -1):
        import torch

        return max(torch.cuda.device_count(), 1)
    if isinstance(devices, (list, tuple)) or hasattr(devices, "__len__") and not isinstance(devices, str):
        return len(devices)
    raise ValueError(f"trainer.devices={devices!r}: expected a positive int, a list of device indices or 'auto'")


def batch_plan(global_batch: int, devices, num_nodes: int = 1, micro_batch_size: int | None = None) -> dict[str, int]:
    """{world_size, rank_batch_size, micro_batch_size, grad_accumulation} of a global batch; one ValueError naming the
    keys when the numbers do not divide. micro_batch_size None: the whole rank batch in one forward."""
    world = device_count(devices) * int(num_nodes)
    global_batch = int(global_batch)
    if global_batch < 1 or global_batch % world:
        raise ValueError(f"world.training.batch_size={global_batch} (the global batch) is not a positive multiple of "
                         f"trainer.devices x trainer.num_nodes = {world}")
    rank_batch = global_batch // world
    micro = rank_batch if micro_batch_size in (None, "null") else int(micro_batch_size)
    if micro < 1 or rank_batch % micro:
        raise ValueError(f"world.training.micro_batch_size={micro} does not divide the per-device batch {rank_batch} "
                         f"(world.training.batch_size={global_batch} over {world} devices)")
    return {"world_size": world, "rank_batch_size": rank_batch, "micro_batch_size": micro,
            "grad_accumulation": rank_batch // micro}


def frozen_dtype(precision) -> str:
    """The dtype frozen models (the teacher) are stored in under a trainer precision: bfloat16 under bf16 precisions."""
    return "bfloat16" if str(precision) in BF16_PRECISIONS else "float32"


def register_resolvers() -> None:
    resolvers = {
        "hiar_rank_batch": lambda b, d, n, m: batch_plan(b, d, n, m)["rank_batch_size"],
        "hiar_grad_accumulation": lambda b, d, n, m: batch_plan(b, d, n, m)["grad_accumulation"],
        "hiar_frozen_dtype": frozen_dtype,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
