"""Peak GPU memory per rank and FLOPs of one DMD iteration, without a GPU: `python -m src.perf estimate <overrides>`.

The project's real DistillTask (its rollout, DMD, critic and forward-KL losses, the models with activation
checkpointing as configured) runs one generator update and one critic update on fake tensors (`FakeTensorMode`:
shapes and dtypes, no storage) under a TorchDispatchMode tracker (`LiveBytes`: live bytes at the peak by category,
and FLOPs by `torch.utils.flop_counter`'s per-op formulas). PyTorch's MemTracker refuses a module called several times
per iteration (a rollout calls the generator once per block and step), and FlopCounterMode's module tracker keeps
activations alive, hence the own tracker. What fake tensors cannot simulate is accounted for explicitly, per strategy
and world size, from the models' parameter counts (`static_memory`):

* the trained models' weights, gradients, fp32 master weights and AdamW states, and the frozen teacher, sharded or
  replicated as each strategy does (ZeRO-2 / ZeRO-3 partitions, FSDP2 shards, optimizer offload to CPU), plus the
  transient full-size buffers a sharding strategy gathers (one or two transformer blocks, DeepSpeed's buckets);
* the umT5 text encoder, offloaded after each encode: it adds to the static memory only while encoding.

Activations (everything the iteration allocates that is neither a parameter, a gradient nor an optimizer state: saved
tensors, the KV cache, temporaries, autocast's bf16 weight copies) are measured; they do not depend on the strategy
except through the compute dtype (DeepSpeed: bf16 weights; one device / ddp / fsdp2: Lightning's bf16 autocast over
fp32 weights, which keeps bf16 copies of the weights for the step). The exit step is the last one (most forwards:
the FLOPs' worst case; the activations with grad are one forward per block at any exit step).

Attention runs on the CPU's SDPA kernel here: its fake kernel saves O(L) per head (output + logsumexp), as the GPU's
flash / cuDNN / memory-efficient kernels do. A boolean mask that a GPU kernel turns into an additive bf16 bias
(memory-efficient SDPA) is not simulated; the dense mask itself is counted.

`estimate_dmd_iteration(overrides)` and `measure_dmd_iteration(overrides)` (one real iteration with random weights on
the current device: torch.cuda.max_memory_allocated on a GPU, the same tracker on real tensors on CPU) return dicts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import weakref
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import src.models.kv_cache as kv_cache
from src.distributed.config import batch_plan
from src.distributed.parallelize import ParallelizeConfig, parallelize_dit
from src.distributed.strategies import dit_children

ROOT = Path(__file__).resolve().parents[2]
GPU_SIZES_GB = (24, 48, 80, 141)
GIB = 2**30
STRATEGY_NAMES = ("single", "ddp", "deepspeed_zero2", "deepspeed_zero2_offload", "deepspeed_zero3",
                  "deepspeed_zero3_offload", "fsdp2")
UMT5_PARAMETERS = 5_680_000_000  # umT5-XXL encoder, ~5.7B (wan21.md §6), bf16


# --------------------------------------------------------------------------------------------- config


def compose(overrides: list[str]) -> DictConfig:
    """The config `python -m src.train <overrides>` would run (the distillation stage)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # paths interpolate ${hydra:...}
    if cfg.get("stage") != "student":
        raise ValueError("src.perf.estimate estimates the distillation stage: pass experiment=hiar_fkl (or hiar / "
                         "self_forcing) with the overrides you give src.train")
    return cfg


def strategy_name(cfg: DictConfig) -> str:
    """The conf/strategy choice (Hydra's record of it; "single": one device without a strategy), its DeepSpeed stage and
    offload read from the composed node (they can be overridden: strategy.stage=3)."""
    from hydra.core.hydra_config import HydraConfig

    choice = HydraConfig.get().runtime.choices.get("strategy")
    if choice in (None, "null"):
        return "single"
    if choice.startswith("deepspeed"):
        node = cfg.strategy
        return f"deepspeed_zero{int(node.stage)}" + ("_offload" if node.get("offload_optimizer") else "")
    if choice in ("ddp", "fsdp2"):
        return choice
    raise ValueError(f"src.perf.estimate does not know strategy={choice}")


# --------------------------------------------------------------------------------------------- the iteration


class ShapeTextEncoder:
    """Stands in for the world's text encoder: embeddings of the right shape (the encoder's memory is added
    explicitly: it is offloaded after each encode)."""

    def __init__(self, text_len: int, text_dim: int):
        self.text_len, self.text_dim = text_len, text_dim

    def requires_grad_(self, flag: bool = True):
        return self

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(prompts)
        return torch.zeros(n, self.text_len, self.text_dim), torch.ones(n, self.text_len, dtype=torch.bool)


class SmallTensorsReal(TorchDispatchMode):
    """Entered inside FakeTensorMode: an op none of whose inputs is fake and whose result is small (timestep lists,
    frame indices, attention visibility per frame, the iteration counter) runs for real, so the code may read its
    values back (`.item()`, `bool()`, `.tolist()`); everything else stays fake (shapes and dtypes only)."""

    MAX_ELEMENTS = 4096  # the scheduler's 1000-point sigma grid, per-frame visibility; activations are larger

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensor, unset_fake_temporarily

        kwargs = kwargs or {}
        leaves = pytree.tree_leaves((args, kwargs))
        if any(isinstance(t, FakeTensor) for t in leaves):
            return func(*args, **kwargs)
        try:
            out = func(*args, **kwargs)  # fake: tells the result's size
        except DataDependentOutputException:  # reading a real tensor's value
            out = None
        results = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if out is None or all(t.numel() <= self.MAX_ELEMENTS for t in results):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        return out


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages allocated while it is active, live at each moment; the peak and what was live at it by
    category. Storages that exist before (the models' weights, the optimizer states) are not counted:
    they are the static memory, which the strategy decides. `mark(category, tensors)` labels storages (the
    gradients, before the optimizer step); everything unlabelled is an activation (saved tensors, the
    KV cache, temporaries, autocast's weight copies). Works on fake and real tensors alike (PyTorch keeps a storage's
    Python object alive as long as the storage)."""

    def __init__(self):
        super().__init__()
        self.seq, self.total, self.peak, self.peak_seq, self.flops = 0, 0, 0, 0, 0
        self.live: dict[int, list] = {}  # storage key -> [nbytes, allocated at, freed at, category, weakref]
        self.entries: list[list] = []

    def _freed(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.seq += 1
            entry[2] = self.seq
            self.total -= entry[0]

    def _track(self, tensor: torch.Tensor, op) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        self.seq += 1
        entry = [storage.nbytes(), self.seq, None, "activations", None, (str(op), tuple(tensor.shape), str(tensor.dtype))]
        entry[4] = weakref.ref(storage, lambda _, key=key: self._freed(key))
        self.live[key] = entry
        self.entries.append(entry)
        self.total += entry[0]
        if self.total > self.peak:
            self.peak, self.peak_seq = self.total, self.seq

    def mark(self, category: str, tensors) -> None:
        for t in tensors:
            entry = self.live.get(t.untyped_storage()._cdata)
            if entry is not None:
                entry[3] = category

    def at_peak(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for nbytes, allocated, freed, category, *_ in self.entries:
            if allocated <= self.peak_seq and (freed is None or freed > self.peak_seq):
                out[category] = out.get(category, 0) + nbytes
        return out

    def largest_at_peak(self, n: int = 12, at: int | None = None) -> list[tuple]:
        """What was live at the peak (or at sequence number `at`), grouped by (category, creating op, shape, dtype),
        largest total first: (total bytes, count, category, op, shape, dtype). For diagnosis."""
        at = self.peak_seq if at is None else at
        groups: dict[tuple, list[int]] = {}
        for e in self.entries:
            if e[1] <= at and (e[2] is None or e[2] > at):
                g = groups.setdefault((e[3], *e[5]), [0, 0])
                g[0] += e[0]
                g[1] += 1
        return sorted(((b, c, *k) for k, (b, c) in groups.items()), reverse=True)[:n]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils.flop_counter import flop_registry

        out = func(*args, **(kwargs or {}))
        # FLOPs by FlopCounterMode's own per-op formulas (its module tracker would keep activations alive)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.flops += int(count(*args, **(kwargs or {}), out_val=out))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or an in-place result: no new storage (and maybe one that predates the tracker)
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, func)
        return out


def gpu_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention as a CUDA GPU runs it, memory-wise: FlashAttention without a mask (bf16/fp16),
    the memory-efficient kernel otherwise, a boolean mask first turned into an additive bias of the query's dtype
    (a new [Lq, Lk] tensor per call, saved for the backward). Both save O(L) per head (output + logsumexp); the CPU's
    math fallback would materialise [B, H, Lq, Lk] scores, which no GPU kernel does."""
    aten = torch.ops.aten
    if attn_mask is None and not is_causal and query.dtype in (torch.bfloat16, torch.float16):
        return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, False, False, scale=scale)[0]
    bias = attn_mask
    if bias is not None and bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, dtype=query.dtype).masked_fill(~bias, float("-inf"))
    if bias is not None:
        bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    return aten._scaled_dot_product_efficient_attention(query, key, value, bias, True, dropout_p, is_causal,
                                                        scale=scale)[0]


@contextlib.contextmanager
def gpu_attention_kernels():
    """Route F.scaled_dot_product_attention through gpu_sdpa (fake tensors only: the kernels are CUDA's)."""
    real = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = gpu_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = real


@contextlib.contextmanager
def largest_kv_cache(record: dict):
    """Records the largest KV cache (bytes, KVCache.nbytes) seen when a forward places frames in it."""
    name = next(n for n in ("place", "commit_write") if hasattr(kv_cache.KVCache, n))
    real = getattr(kv_cache.KVCache, name)

    def recording(cache, *args, **kwargs):
        out = real(cache, *args, **kwargs)
        record["kv_cache"] = max(record.get("kv_cache", 0), cache.nbytes())
        return out

    setattr(kv_cache.KVCache, name, recording)
    try:
        yield
    finally:
        setattr(kv_cache.KVCache, name, real)


def compute_mode(cfg: DictConfig, strategy: str) -> str:
    """How the trained models compute: "bf16_weights" (DeepSpeed's bf16 engines), "autocast_bf16" (Lightning's
    bf16-mixed over fp32 weights), "fp32"."""
    precision = str(cfg.trainer.get("precision", "32-true"))
    if strategy.startswith("deepspeed") and (precision.startswith("bf16") or cfg.strategy.get("bf16", False)):
        return "bf16_weights"
    return "autocast_bf16" if precision.startswith("bf16") else "fp32"


def build_task(cfg: DictConfig, device: str | torch.device = "cpu", model_mode=None,
               weights_dtype: torch.dtype | None = None):
    """The configured DistillTask with random weights (no checkpoint is read) and a shape-only text encoder. With
    `model_mode` (a FakeTensorMode) only the three models are built inside it; the rest of the task (schedules,
    small tensors it reads back) stays real. `weights_dtype`: every model in that dtype (DeepSpeed's bf16 engines)."""
    import src.training.distill as distill
    from src.models.wan import WanDiT
    from src.training.teacher import model_config

    world = OmegaConf.to_container(cfg.world, resolve=True)
    text = world["text_encoder"]
    world.update(teacher_checkpoint=None, critic_init=None,
                 text_encoder={"_target_": "src.perf.estimate.ShapeTextEncoder", "text_len": text["text_len"],
                               "text_dim": text["text_dim"]},
                 codec={"_target_": "src.worlds.toy.codec.ToyCodec", "factor": 2})
    kwargs = OmegaConf.to_container(cfg.task, resolve=True)
    kwargs.pop("_target_")
    kwargs.update(world=world, generator_init=None, export_dir=None)
    real_loader = distill.load_world_model

    def load_world_model(config, checkpoint, which="auto", dtype=None):
        default = torch.get_default_dtype()
        torch.set_default_dtype(weights_dtype or dtype or torch.float32)  # built in its dtype: no cast of fakes
        try:
            with model_mode or contextlib.nullcontext(), torch.device(device):
                return WanDiT(model_config(config))
        finally:
            torch.set_default_dtype(default)

    distill.load_world_model = load_world_model
    try:
        task = distill.DistillTask(**kwargs)
    finally:
        distill.load_world_model = real_loader
    # activation checkpointing as every strategy applies it (compile is not modelled: fake tensors count eager ops)
    checkpointing = ParallelizeConfig(activation_checkpointing=bool(cfg.parallelize.activation_checkpointing))
    for dit in dit_children(task).values():
        parallelize_dit(dit, checkpointing)
    return task if model_mode is not None else task.to(device)


def micro_batch_size(cfg: DictConfig) -> int:
    t = cfg.world.training
    plan = batch_plan(t.batch_size, cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1),
                      t.get("micro_batch_size"))
    return plan["micro_batch_size"]


def one_iteration(task, micro: int, mode: str, device, phase_hook, mark=lambda category, tensors: None,
                  exit_step: int | None = None) -> None:
    """One generator update and one critic update as DistillTask.update runs them (zero_grad, loss, backward, clip,
    step, zero_grad), each inside phase_hook(name, model, optimizer) (a context manager that measures it); `mark`
    labels the gradients before the step. The optimizer states exist before the phases (the steady state of every
    iteration after the first): created inside, they would set a small update's peak at the step and hide its
    activations."""
    o = task.hparams.optim
    betas = tuple(float(b) for b in o["betas"])
    optimizers = {name: torch.optim.AdamW(getattr(task, name).parameters(), lr=float(o[f"lr_{name}"]), betas=betas,
                                          weight_decay=float(o["weight_decay"]), foreach=False)
                  for name in ("generator", "critic")}
    for optimizer in optimizers.values():
        create_optimizer_states(optimizer)
    num_frames, (c, h, w) = task.hparams.num_frames, task.latent_shape
    exit_step = task.sampler_cfg.num_steps - 1 if exit_step is None else int(exit_step)
    positions = list(range(micro))
    autocast = (torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if mode == "autocast_bf16"
                else contextlib.nullcontext())
    for name in ("generator", "critic"):
        model, optimizer = getattr(task, name), optimizers[name]
        with phase_hook(name, model, optimizer):
            batch = {"prompt": ["a prompt"] * micro, "trajectory": torch.randn(micro, 5, num_frames, c, h, w,
                                                                                 device=device),
                     "sigmas": torch.tensor([[1.0, 0.96, 0.889, 0.727, 0.0]] * micro, device=device)}
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                if name == "generator":
                    loss, parts = task.generator_loss(batch, positions, exit_step)
                else:
                    loss, parts = task.critic_update_loss(batch, positions, exit_step)
            loss.backward()
            del loss, parts  # the graph is freed before the step, as in DistillTask.update
            mark("gradients", [p.grad for p in model.parameters() if p.grad is not None])
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(o["grad_clip"]), foreach=False)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def create_optimizer_states(optimizer: torch.optim.Optimizer) -> None:
    """The optimizer's states as after its first step: one step on zero gradients (AdamW creates its moments lazily)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def tracked_iteration(cfg: DictConfig, mode: str, fake: bool, device="cpu", exit_step: int | None = None,
                      gpu_kernels: bool = True) -> dict:
    """Per update: live bytes at its peak by category, the largest KV cache, FLOPs; on fake or real tensors.
    exit_step None: the last (most forwards, the FLOPs' worst case). gpu_kernels (fake only): attention as CUDA's
    kernels allocate (gpu_sdpa); False keeps the CPU's SDPA, to compare fake with real tensors like for like."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    results: dict = {}
    current: list[LiveBytes] = []

    @contextlib.contextmanager
    def phase(name, model, optimizer):
        record: dict = {}
        tracker = LiveBytes()
        current[:] = [tracker]
        start = time.perf_counter()
        with largest_kv_cache(record), tracker:
            yield
        results[name] = {"peak_by_category": tracker.at_peak(), "peak": tracker.peak, "live_after": tracker.total,
                         "largest_at_peak": tracker.largest_at_peak(),
                         "largest_after": tracker.largest_at_peak(at=tracker.seq),
                         "kv_cache": int(record.get("kv_cache", 0)), "flops": tracker.flops,
                         "seconds": time.perf_counter() - start}

    def mark(category, tensors):
        current[0].mark(category, tensors)

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    task = build_task(cfg, device, fake_mode, torch.bfloat16 if mode == "bf16_weights" else None)
    fake_only = ((SmallTensorsReal(), *([gpu_attention_kernels()] if gpu_kernels else [])) if fake else ())
    with fake_mode or contextlib.nullcontext(), contextlib.ExitStack() as stack:
        for context in fake_only:
            stack.enter_context(context)
        one_iteration(task, micro_batch_size(cfg), mode, device, phase, mark, exit_step)
    counts = {name: sum(p.numel() for p in getattr(task, name).parameters()) for name in ("generator", "critic", "teacher")}
    block = {name: max(sum(p.numel() for p in b.parameters()) for b in getattr(task, name).blocks)
             for name in ("generator", "critic", "teacher")}
    teacher_bytes = {p.dtype.itemsize for p in task.teacher.parameters()}.pop()
    return {"updates": results, "parameters": counts, "largest_block": block, "teacher_bytes_per_param": teacher_bytes,
            "exit_step": task.sampler_cfg.num_steps - 1 if exit_step is None else int(exit_step)}


def activations(update: dict) -> int:
    """Bytes at the update's peak that are not parameters, gradients or optimizer states (those follow the strategy)."""
    return update["peak_by_category"].get("activations", 0)


# --------------------------------------------------------------------------------------------- static memory


def static_memory(strategy: str, world_size: int, counts: dict, block: dict, updated: str, teacher_bytes: int,
                  bucket_elements: int = 200_000_000) -> dict[str, float]:
    """Bytes per rank of weights, gradients (of the updated model), fp32 master weights + AdamW states, the teacher,
    and the full-size buffers the strategy gathers, as each strategy keeps them (the sharding that fake tensors cannot
    simulate). Trained models: generator and critic; both stay resident during either update."""
    n = world_size
    trained = counts["generator"] + counts["critic"]
    upd, blk, t_blk = counts[updated], block[updated], block["teacher"]
    teacher = teacher_bytes * counts["teacher"]
    bucket = 2 * min(bucket_elements, upd)  # DeepSpeed's bf16 reduce bucket (overlap_comm off: one buffer)
    if strategy in ("single", "ddp"):  # fp32 weights are the master weights; everything replicated
        return {"weights": 4 * trained, "gradients": 4 * upd, "master_and_optimizer": 8 * trained,
                "teacher": teacher, "gathered": 0}
    if strategy.startswith("deepspeed_zero2"):
        offload = strategy.endswith("offload")
        return {"weights": 2 * trained, "gradients": bucket + (0 if offload else 2 * upd / n),
                "master_and_optimizer": 0 if offload else 12 * trained / n, "teacher": teacher, "gathered": 0}
    if strategy.startswith("deepspeed_zero3"):
        offload = strategy.endswith("offload")
        prefetch = 50_000_000  # stage3_prefetch_bucket_size default (elements)
        return {"weights": 2 * trained / n, "gradients": bucket + (0 if offload else 2 * upd / n),
                "master_and_optimizer": 0 if offload else 12 * trained / n, "teacher": teacher / n,
                "gathered": 2 * (max(blk, t_blk) + prefetch)}
    if strategy == "fsdp2":  # fp32 sharded parameters (master), Lightning autocast; current + prefetched block
        return {"weights": 4 * trained / n, "gradients": 4 * upd / n + 4 * blk, "master_and_optimizer": 8 * trained / n,
                "teacher": teacher / n, "gathered": max(2 * 4 * blk, 2 * teacher_bytes * t_blk)}
    raise ValueError(f"unknown strategy {strategy!r}; one of {STRATEGY_NAMES}")


def verdicts(peak: float, static: float, act_per_sample: float, frames: int, frames_per_block: int,
             reserve_gib: float = 2.0) -> dict:
    """Per GPU size: fits (>= 10% free) / tight / no; the largest per-device micro-batch and, at batch 1, the largest
    number of frames (activations extrapolated linearly in frames; the KV cache is window-bounded, so this errs low)."""
    out = {}
    for size in GPU_SIZES_GB:
        usable = (size - reserve_gib) * GIB
        free = usable - peak
        verdict = "fits" if free >= 0.1 * size * GIB else ("tight" if free >= 0 else "no")
        room = usable - static
        batch = max(int(room // act_per_sample), 0) if act_per_sample > 0 else 0
        per_frame = act_per_sample / frames
        max_frames = int(room // per_frame) // frames_per_block * frames_per_block if per_frame > 0 else 0
        out[f"{size}"] = {"verdict": verdict, "free_gib": free / GIB, "max_batch": batch,
                          "max_frames_at_batch_1": max(max_frames, 0)}
    return out


# --------------------------------------------------------------------------------------------- public API


def report(cfg: DictConfig, measured: dict, strategy: str, world_size: int) -> dict:
    """Combine the measured activations with the strategy's static memory into the per-update peaks and verdicts."""
    micro = micro_batch_size(cfg)
    frames = int(cfg.task.num_frames)
    fpb = int(cfg.world.frames_per_block)
    bucket = int(cfg.strategy.get("reduce_bucket_size", 200_000_000)) if cfg.get("strategy") else 0
    encoder = 2 * UMT5_PARAMETERS if "umt5" in str(cfg.world.text_encoder.get("weights", "")).lower() else 0
    updates = {}
    for name, update in measured["updates"].items():
        static = static_memory(strategy, world_size, measured["parameters"], measured["largest_block"], name,
                               measured["teacher_bytes_per_param"], bucket)
        act = activations(update)
        peak = sum(static.values()) + act
        updates[name] = {
            "static_gib": {k: v / GIB for k, v in static.items()},
            "activations_gib": act / GIB, "kv_cache_gib": update["kv_cache"] / GIB,
            "peak_gib": peak / GIB, "tflops": update["flops"] / 1e12,
            "verdicts": verdicts(peak, sum(static.values()), act / micro, frames, fpb),
        }
    ratio = int(cfg.task.gen_update_ratio)
    worst = max(updates.values(), key=lambda u: u["peak_gib"])
    return {
        "strategy": strategy, "world_size": world_size, "micro_batch_size": micro, "num_frames": frames,
        "activation_checkpointing": bool(cfg.parallelize.activation_checkpointing),
        "compute": compute_mode(cfg, strategy), "parameters": measured["parameters"],
        "updates": updates, "peak_gib": worst["peak_gib"],
        "text_encoder_while_encoding_gib": encoder / GIB,
        "iteration_tflops": updates["critic"]["tflops"] + updates["generator"]["tflops"] / ratio,
        "verdicts": {size: min((u["verdicts"][size] for u in updates.values()),
                               key=lambda v: (v["free_gib"], v["max_batch"])) for size in map(str, GPU_SIZES_GB)},
    }


def world_size_of(cfg: DictConfig) -> int:
    return batch_plan(cfg.world.training.batch_size, cfg.trainer.get("devices", 1),
                      cfg.trainer.get("num_nodes", 1), cfg.world.training.get("micro_batch_size"))["world_size"]


def estimate_dmd_iteration(overrides: list[str]) -> dict:
    """Peak memory per rank (per update, by category) and FLOPs of one DMD iteration, from fake tensors."""
    cfg = compose(overrides)
    strategy = strategy_name(cfg)
    start = time.perf_counter()
    measured = tracked_iteration(cfg, compute_mode(cfg, strategy), fake=True)
    out = report(cfg, measured, strategy, world_size_of(cfg))
    out.update(overrides=list(overrides),
               estimated_from="fake tensors (FakeTensorMode + LiveBytes tracker + flop_counter formulas)",
               seconds=time.perf_counter() - start)
    return out


def measure_dmd_iteration(overrides: list[str]) -> dict:
    """One real iteration (random weights) on the current device: torch.cuda.max_memory_allocated per update on a GPU,
    the same tracker as the estimate on real tensors on CPU. No sharding: run it on one device (strategy ignored)."""
    cfg = compose(overrides)
    strategy = strategy_name(cfg)
    mode = compute_mode(cfg, strategy)
    if torch.cuda.is_available():
        from src.training.distill import DistillTask  # noqa: F401  (imported before the memory is reset)

        device = torch.device("cuda", torch.cuda.current_device())
        task = build_task(cfg, device, weights_dtype=torch.bfloat16 if mode == "bf16_weights" else None)
        results = {}

        @contextlib.contextmanager
        def phase(name, model, optimizer):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            yield
            torch.cuda.synchronize()
            results[name] = {"max_memory_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
                             "seconds": time.perf_counter() - start}

        one_iteration(task, micro_batch_size(cfg), mode, device, phase)
        return {"overrides": list(overrides), "device": torch.cuda.get_device_name(), "updates": results,
                "measured_with": "torch.cuda.max_memory_allocated, one device"}
    measured = tracked_iteration(cfg, mode, fake=False)
    out = report(cfg, measured, "single", 1)
    out.update(overrides=list(overrides), device="cpu", measured_with="src.perf.estimate.LiveBytes on real tensors",
               raw=measured)
    return out


# --------------------------------------------------------------------------------------------- CLI


def format_table(result: dict) -> str:
    lines = [f"strategy {result['strategy']} x {result['world_size']} ranks, micro-batch {result['micro_batch_size']}, "
             f"{result['num_frames']} frames, activation checkpointing {result['activation_checkpointing']}, "
             f"compute {result['compute']}",
             "parameters: " + ", ".join(f"{k} {v / 1e9:.3f}B" for k, v in result["parameters"].items()),
             "", "| GiB per rank | " + " | ".join(result["updates"]) + " |", "|---|" + "---|" * len(result["updates"])]
    rows = [*next(iter(result["updates"].values()))["static_gib"]]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(f"{u['static_gib'][row]:.1f}" for u in result["updates"].values()) + " |")
    for key, label in (("activations_gib", "activations (measured)"), ("kv_cache_gib", "of which largest KV cache"),
                       ("peak_gib", "**peak**"), ("tflops", "TFLOPs")):
        lines.append(f"| {label} | " + " | ".join(f"{u[key]:.1f}" for u in result["updates"].values()) + " |")
    lines += ["", f"iteration TFLOPs (critic + generator / gen_update_ratio): {result['iteration_tflops']:.1f}",
              "text encoder on the GPU while encoding (offloaded after): "
              f"{result['text_encoder_while_encoding_gib']:.1f} GiB", "",
              "| GPU (GiB) | verdict | free GiB | largest micro-batch | largest frames at batch 1 |",
              "|---|---|---|---|---|"]
    for size, v in result["verdicts"].items():
        lines.append(f"| {size} | {v['verdict']} | {v['free_gib']:.1f} | {v['max_batch']} | {v['max_frames_at_batch_1']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the result to this JSON file")
    parser.add_argument("--measure", action="store_true", help="run one real iteration instead (measure_dmd_iteration)")
    args, overrides = parser.parse_known_args(argv)
    result = (measure_dmd_iteration if args.measure else estimate_dmd_iteration)(overrides)
    if args.json:
        from src.io import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=2, default=str))
    print(format_table(result) if "verdicts" in result else json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
