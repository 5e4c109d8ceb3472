"""Trainer strategies for LightningModules that train several models with manual optimisation (conf/strategy/).

The module calls its submodules directly (``self.generator(...)``) and steps one optimizer per trained model; it names
the optimizer a loss trains by calling ``trainer.strategy.backward(loss, optimizer)`` (``DistillTask.backward_for``;
Lightning's automatic optimisation passes the optimizer the same way). Each strategy here works from that alone:

* ``GradSyncDDPStrategy`` (``ddp``): no DDP wrapper (whose forward such a module never calls, and whose reducer expects
  one backward per forward). States are broadcast from rank 0 at setup; after each backward the gradients of that
  optimizer's parameters are averaged over ranks (bucketed all-reduce), so clipping and the step see the global-batch
  gradient. gloo on CPU, NCCL on GPU (Lightning's default per device).
* ``DeepSpeedEnginesStrategy`` (``deepspeed_zero2`` / ``deepspeed_zero3``): one DeepSpeed engine per optimizer (its
  model, its optimizer, its learning rate); the backward goes to the engine of the named optimizer, the clip value to
  DeepSpeed's own global-norm clipping, the step to ``engine.step()``. Frozen children (the teacher) are a plain
  replica in ``frozen_dtype`` under ZeRO-2 and a parameter-partitioned inference engine under ZeRO-3. Checkpoints are
  directories: ``lightning.ckpt`` (module state incl. the EMA, loops; rank 0) plus one DeepSpeed checkpoint per engine.
  Runs on CPU (``DS_ACCELERATOR=cpu``, gloo), which Lightning's own DeepSpeedStrategy refuses.
* ``FSDP2Strategy`` (``fsdp2``): ``fully_shard`` per transformer block and per model, the frozen teacher sharded on
  its own; checkpoints through Lightning's ModelParallelStrategy.

* ``SingleDeviceDiTStrategy`` (the default, conf/trainer/default.yaml): one device, nothing but ``parallelize_dit``.

Every strategy applies ``src.distributed.parallelize.parallelize_dit`` to each DiT child of the module (activation
checkpointing, compile, then its own sharding: none, FSDP2 or a ZeRO engine), with the run's ``parallelize`` settings
(conf/parallelize/), so checkpointing and compile are the same under every strategy and on one device.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from src.distributed.parallelize import ParallelizeConfig, fully_shard_dit, parallelize_dit
from src.io import commit_folder, temporary_sibling
from src.models.wan import WanDiT

LIGHTNING_STATE = "lightning.ckpt"


def broadcast_module_states(module: nn.Module, src: int = 0) -> None:
    """Every parameter and buffer of `module` as on rank `src` (what DDP does when it wraps a module)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src)


def average_gradients(params, bucket_numel: int = 25_000_000) -> None:
    """The mean over ranks of each gradient, in flat buckets of at most `bucket_numel` elements per device and dtype."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world == 1:
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for grads in groups.values():
        bucket, size = [], 0
        for grad in [*grads, None]:
            if grad is None or (bucket and size + grad.numel() > bucket_numel):
                flat = torch.cat([g.reshape(-1) for g in bucket])
                dist.all_reduce(flat)
                flat.div_(world)
                for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                    g.copy_(part.view_as(g))
                bucket, size = [], 0
            if grad is not None:
                bucket.append(grad)
                size += grad.numel()


def dit_children(module: nn.Module) -> dict[str, WanDiT]:
    """The DiTs a LightningModule trains or runs (generator, critic, teacher; the teacher stage's model)."""
    return {name: child for name, child in module.named_children() if isinstance(child, WanDiT)}


class SingleDeviceDiTStrategy(SingleDeviceStrategy):
    """One device (the accelerator's first of ``trainer.devices``), every DiT child through ``parallelize_dit``."""

    def __init__(self, parallelize: ParallelizeConfig | dict | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.parallelize = ParallelizeConfig.of(parallelize)
        self.parallel_devices = None  # set by the Trainer from accelerator and devices (its _lazy_init_strategy)

    @property
    def root_device(self) -> torch.device:
        if self.parallel_devices:
            if len(self.parallel_devices) > 1:
                raise ValueError(f"{type(self).__name__} runs on one device, trainer.devices gives "
                                 f"{len(self.parallel_devices)}: use trainer=ddp or a strategy= choice")
            return self.parallel_devices[0]
        return self._root_device

    def setup(self, trainer) -> None:
        super().setup(trainer)
        for dit in dit_children(self.lightning_module).values():
            parallelize_dit(dit, self.parallelize)


def raw_optimizer(optimizer):
    return optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


def optimizer_params(optimizer) -> list[nn.Parameter]:
    return [p for group in raw_optimizer(optimizer).param_groups for p in group["params"]]


class GradSyncDDPStrategy(DDPStrategy):
    """Data parallel without the DDP wrapper: gradients averaged per optimizer after each backward."""

    def __init__(self, bucket_numel: int = 25_000_000, parallelize: ParallelizeConfig | dict | None = None,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.bucket_numel = int(bucket_numel)
        self.parallelize = ParallelizeConfig.of(parallelize)

    def configure_ddp(self) -> None:
        broadcast_module_states(self.model)

    def setup(self, trainer) -> None:
        super().setup(trainer)
        for dit in dit_children(self.lightning_module).values():  # no wrapper: gradients are averaged after backward
            parallelize_dit(dit, self.parallelize)

    def optimizer_for_backward(self, optimizer):
        """The optimizer a backward serves: the one named, or the only one."""
        if optimizer is not None:
            return raw_optimizer(optimizer)
        if len(self.optimizers) == 1:
            return self.optimizers[0]
        raise ValueError(f"{type(self).__name__} needs to know which of {len(self.optimizers)} optimizers a backward "
                         "serves: call trainer.strategy.backward(loss, optimizer) (DistillTask.backward_for), "
                         "not manual_backward(loss)")

    def backward(self, closure_loss: torch.Tensor, optimizer, *args: Any, **kwargs: Any) -> torch.Tensor:
        optimizer = self.optimizer_for_backward(optimizer)
        loss = super().backward(closure_loss, optimizer, *args, **kwargs)
        average_gradients(optimizer_params(optimizer), self.bucket_numel)
        return loss


class EngineClipping(Precision):
    """32-true precision whose gradient clipping is DeepSpeed's: the clip value goes to the optimizer's engine, which
    clips by the global norm of its (partitioned) gradients inside engine.step()."""

    def __init__(self, strategy: DeepSpeedEnginesStrategy):
        super().__init__()
        self.strategy = strategy

    def clip_gradients(self, optimizer, clip_val: int | float = 0.0, gradient_clip_algorithm=None) -> None:
        if clip_val and str(getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm)) != "norm":
            raise ValueError("DeepSpeed clips gradients by norm only (gradient_clip_algorithm='norm')")
        self.strategy.engine(optimizer).optimizer.clip_grad = float(clip_val or 0.0)


class DeepSpeedEnginesStrategy(GradSyncDDPStrategy):
    """One DeepSpeed ZeRO engine per optimizer; see the module docstring."""

    def __init__(self, stage: int = 2, offload_optimizer: bool = False, bf16: bool = True,
                 frozen_dtype: str = "bfloat16", reduce_bucket_size: int = 200_000_000, **kwargs: Any):
        if stage not in (2, 3):
            raise ValueError(f"DeepSpeedEnginesStrategy: stage must be 2 or 3, got {stage}")
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            import deepspeed
        except ImportError as e:
            raise ImportError("the deepspeed_zero* strategies need DeepSpeed: pip install -e '.[deepspeed]'") from e
        super().__init__(**kwargs)
        self.deepspeed = deepspeed
        self.stage, self.offload_optimizer, self.bf16 = stage, offload_optimizer, bf16
        self.frozen_dtype = getattr(torch, frozen_dtype)
        self.reduce_bucket_size = int(reduce_bucket_size)
        self.engines: dict[int, Any] = {}  # id(raw optimizer) -> engine
        self.engine_names: dict[int, str] = {}
        self.resume_dir: Path | None = None

    # ------------------------------------------------------------------------------------------- set-up

    def setup_distributed(self) -> None:
        super().setup_distributed()
        self.deepspeed.init_distributed(dist_backend=self._process_group_backend, dist_init_required=False)

    def ds_config(self, trainable: bool) -> dict:
        on_gpu = self.root_device.type == "cuda"
        zero: dict[str, Any] = {"stage": self.stage, "overlap_comm": False, "contiguous_gradients": True,
                                "reduce_scatter": on_gpu,  # reduce_scatter is NCCL-only; all_reduce on gloo
                                "reduce_bucket_size": self.reduce_bucket_size}
        if trainable and self.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
        return {
            "train_micro_batch_size_per_gpu": 1,  # DeepSpeed's data loader is not used; batches come from Lightning
            "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False,  # the module accumulates micro-batches; step() is the boundary
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,  # keep the module's torch AdamW, also when offloaded
            "bf16": {"enabled": self.bf16 and trainable},
            "gradient_clipping": 0.0,  # set per step from the module's clip_gradients (EngineClipping)
            "steps_per_print": 2**31 - 1,
        }

    def setup(self, trainer) -> None:
        if trainer.precision in ("bf16-mixed", "bf16"):  # the precision policy (trainer=gpu_bf16) is the bf16 flag
            self.bf16 = True
        elif trainer.precision not in ("32-true", "32"):
            raise ValueError(f"{type(self).__name__}: use trainer.precision=bf16-mixed (trainer=gpu_bf16: bf16 engines "
                             f"with fp32 master weights) or 32-true with strategy.bf16 (got {trainer.precision})")
        self.accelerator.setup(trainer)
        self.model_to_device()
        broadcast_module_states(self.model)
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            self.build_engines()
        else:
            for dit in dit_children(self.lightning_module).values():
                parallelize_dit(dit, self.parallelize)
        self.precision_plugin = EngineClipping(self)

    def build_engines(self) -> None:
        module = self.lightning_module
        children = dict(module.named_children())
        owned = set()
        for optimizer in self.optimizers:
            ids = {id(p) for p in optimizer_params(optimizer)}
            names = [n for n, c in children.items() if ids and {id(p) for p in c.parameters()} == ids]
            if len(names) != 1:
                raise ValueError(f"{type(self).__name__}: each optimizer must hold exactly the parameters of one child "
                                 f"module of {type(module).__name__} (one engine per model)")
            engine = parallelize_dit(children[names[0]], self.parallelize, lambda model, optimizer=optimizer: (
                self.deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config(trainable=True),
                                          dist_init_required=False)[0]))
            self.engines[id(optimizer)], self.engine_names[id(optimizer)] = engine, names[0]
            owned.add(names[0])
        for name, child in children.items():
            params = list(child.parameters())
            if name in owned or not params or any(p.requires_grad for p in params):
                continue
            if self.stage == 3:  # a partitioned inference engine; the module's forward hooks gather its parameters
                parallelize_dit(child.to(self.frozen_dtype), self.parallelize, lambda model: self.deepspeed.initialize(
                    model=model, config=self.ds_config(trainable=False), dist_init_required=False))
            else:
                parallelize_dit(child.to(self.frozen_dtype), self.parallelize)

    def engine(self, optimizer):
        optimizer = raw_optimizer(optimizer)
        if id(optimizer) not in self.engines:
            raise ValueError(f"{type(self).__name__}: no DeepSpeed engine for this optimizer")
        return self.engines[id(optimizer)]

    # ------------------------------------------------------------------------------------------- step

    def backward(self, closure_loss: torch.Tensor, optimizer, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:
            raise TypeError(f"{type(self).__name__}.backward takes no extra backward arguments")
        self.engine(self.optimizer_for_backward(optimizer)).backward(closure_loss, scale_wrt_gas=False)
        return closure_loss

    def optimizer_step(self, optimizer, closure, model=None, **kwargs: Any) -> Any:
        output = closure()  # automatic optimisation: forward + backward; manual: a no-op
        module = self.lightning_module
        if module.automatic_optimization:  # manual optimisation clips through module.clip_gradients
            trainer = module.trainer
            self.precision_plugin.clip_gradients(optimizer, trainer.gradient_clip_val or 0.0,
                                                 trainer.gradient_clip_algorithm or "norm")
        self.engine(optimizer).step()
        return output

    # ------------------------------------------------------------------------------------------- checkpoints

    def optimizer_state(self, optimizer) -> dict:
        return {}  # in the engine's own checkpoint (partitioned per rank)

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any = None) -> None:
        """Every rank writes into one new temporary folder beside `filepath`; rank 0 then fsyncs it and renames it into
        place (src.io.commit_folder), so a kill at any moment leaves the previous checkpoint loadable."""
        path = Path(self.broadcast(str(filepath)))
        tmp = Path(self.broadcast(str(temporary_sibling(path))))  # rank 0's name
        if self.is_global_zero:
            tmp.mkdir(parents=True)
        self.barrier()
        try:
            for optimizer in self.optimizers:
                self.engine(optimizer).save_checkpoint(str(tmp), tag=self.engine_names[id(raw_optimizer(optimizer))],
                                                       save_latest=False)
            if self.is_global_zero:
                self.checkpoint_io.save_checkpoint(checkpoint, tmp / LIGHTNING_STATE, storage_options=storage_options)
            self.barrier()
            if self.is_global_zero:
                commit_folder(tmp, path)
        except BaseException:
            if self.is_global_zero:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.barrier()

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero:
            shutil.rmtree(filepath, ignore_errors=True)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        path = Path(self.broadcast(str(checkpoint_path)))
        if not (path / LIGHTNING_STATE).is_file():
            raise FileNotFoundError(f"{path} is not a {type(self).__name__} checkpoint (no {LIGHTNING_STATE} in it)")
        self.resume_dir = path
        return self.checkpoint_io.load_checkpoint(path / LIGHTNING_STATE, weights_only=True)

    def load_optimizer_state_dict(self, checkpoint: dict) -> None:
        """Each engine from its own checkpoint: module weights, fp32 master weights and optimizer partitions."""
        for optimizer in self.optimizers:
            load_path, _ = self.engine(optimizer).load_checkpoint(
                str(self.resume_dir), tag=self.engine_names[id(raw_optimizer(optimizer))],
                load_optimizer_states=True, load_lr_scheduler_states=False)
            if load_path is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint {self.engine_names[id(raw_optimizer(optimizer))]} "
                                        f"in {self.resume_dir}")


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 without a configure_model() in the module: every DiT child goes through ``parallelize_dit`` with
    ``fully_shard`` per transformer block and then on the child (``fully_shard_dit``), frozen ones on their own.
    reshard_after_forward: True ~ ZeRO-3, False ~ ZeRO-2. Data parallel only (no tensor parallelism). GPU (NCCL) only.
    Under trainer.precision=bf16-mixed the sharded parameters stay fp32 (master weights) and Lightning's autocast
    computes in bf16."""

    def __init__(self, reshard_after_forward: bool = True, parallelize: ParallelizeConfig | dict | None = None,
                 **kwargs: Any):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)
        self.reshard_after_forward = reshard_after_forward
        self.parallelize = ParallelizeConfig.of(parallelize)

    def setup_environment(self) -> None:
        # data parallel over every rank (Lightning's "auto" is one data-parallel group per node, for 2D meshes)
        self._data_parallel_size = self.world_size
        super().setup_environment()

    def shard_module(self, module: nn.Module) -> None:
        mesh = self.device_mesh["data_parallel"]
        for dit in dit_children(module).values():
            parallelize_dit(dit, self.parallelize, lambda model: fully_shard_dit(model, mesh, self.reshard_after_forward))

    def setup(self, trainer) -> None:
        if self.root_device.type != "cuda":
            raise RuntimeError(f"{type(self).__name__} runs on CUDA GPUs (NCCL); on CPU use strategy=ddp")
        self.accelerator.setup(trainer)
        self.model_to_device()
        self.shard_module(self.lightning_module)
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
