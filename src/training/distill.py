"""HiAR distillation as one LightningModule: DMD over a step-first self-rollout, plus the forward-KL regulariser.

Three models (hiar_method.md §7):
* generator: the causal few-step student (trainable), initialised from the ODE-init stage or the base model;
* teacher (real score): frozen, bidirectional, classifier-free guided as c + s (c - u) against the negative prompt;
* critic (fake score): trainable, bidirectional, initialised from the base model.

Every iteration updates the critic (flow loss on a no-grad rollout); every `gen_update_ratio`-th iteration first
updates the generator (DMD loss on a rollout whose exit-step forwards carry grad, plus `fkl.weight` times the
forward-KL loss on a batch of teacher ODE trajectories). Rollouts are the samplers' own schedules
(`src.sampling.orders.sample` with `exit_step`): step-first for HiAR, block-first for the Self-Forcing baseline.

Distributed training (src/distributed, docs/distributed.md): every random draw of a sample -- its rollout noise,
its DMD / critic timestep and noise -- is keyed by (seed, iteration, purpose, the sample's index in the iteration's
global batch), never by the rank or a global RNG, so the losses do not depend on how the global batch is split over
ranks and `grad_accumulation` micro-batches. Backward goes through `backward_for(optimizer, loss)`, which names the
optimizer (hence the model) a loss trains, so that a strategy with one engine per model can route it.

`trainer.max_steps` counts optimizer steps (critic and generator), as Self-Forcing's trainer does: N iterations take
N * (1 + 1/gen_update_ratio) steps. The EMA of the generator (decay 0.99 from iteration 200) is kept here rather than
by Lightning's WeightAveraging callback, which averages the whole LightningModule (critic included) and swaps the
averaged weights into the module at the end of fit; we need a separate generator_ema to export and to sample with.
It is an fp32 shadow of the fp32 master weights (src/training/ema.py), optionally in host memory (`ema.device`).

Precision policy (docs/distributed.md): fp32 master weights and optimizer states, bf16 compute (trainer=gpu_bf16),
the frozen teacher stored in `teacher_dtype` (bf16 under that policy, loaded straight into it). Activation
checkpointing and compile are applied to the models from outside, by every strategy (src/distributed/parallelize.py).

Settings have one home, conf/task/distill.yaml (and the default forward-KL group, conf/fkl/bidirectional.yaml): a key
of `dmd`, `fkl`, `optim`, `ema` or `nonfinite` left out by a caller (tests, scripts) takes the value written there;
the ones the YAML takes from the world (learning rates, EMA start) must be given.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.core.optimizer import LightningOptimizer
from omegaconf import OmegaConf
from torch._subclasses.fake_tensor import is_fake

from src.artifacts import verify_artifact
from src.checkpoints import export_training_checkpoint, load_dit, save_dit
from src.flow_matching import (
    SIGMA_LOOKUPS,
    add_noise,
    lookup_timesteps,
    sample_training_timesteps,
    velocity_from_x0,
    x0_from_velocity,
)
from src.io import CHECKSUM_SUFFIX, clean_partial
from src.models.kv_cache import CACHE_GRADIENTS
from src.models.wan import WanDiT
from src.sampling.noise import NoiseBank, derived_seed
from src.sampling.orders import SamplerConfig, sample
from src.training.checkpoint_io import TASK_KEY, check_checkpoint_task, task_record
from src.training.ema import GeneratorEMA, master_parameters
from src.training.guards import NonFiniteError, NonFiniteGuard, drop_gradients, save_finite
from src.training.teacher import model_config, plain

ROLLOUT_ORDERS = ("step_first", "block_first")
FKL_ATTENTION = ("bidirectional", "causal")
CONF = Path(__file__).resolve().parents[2] / "conf"
SETTING_GROUPS = ("dmd", "fkl", "optim", "ema", "nonfinite")
WORLD_SETTINGS = (("optim", "lr_generator"), ("optim", "lr_critic"), ("ema", "start"))  # the YAML interpolates these


@functools.cache
def yaml_settings() -> dict[str, dict]:
    """The values conf/task/distill.yaml writes for each settings group (conf/fkl/bidirectional.yaml for `fkl`, the
    default fkl choice); keys it interpolates from the world are left out: they have no value but the world's."""
    # the default numerics group resolves the keys it sets (dmd.sigma_lookup); the world's stay unresolved
    root = OmegaConf.merge(OmegaConf.load(CONF / "numerics" / "default.yaml"),
                           {"task": OmegaConf.load(CONF / "task" / "distill.yaml"),
                            "fkl": OmegaConf.load(CONF / "fkl" / "bidirectional.yaml")})
    nodes = {group: root.task[group] for group in SETTING_GROUPS if group != "fkl"}
    nodes["fkl"] = root.fkl

    def known(node, key) -> bool:
        return not OmegaConf.is_interpolation(node, key) or str(node._get_node(key)._value()).startswith("${numerics.")

    def value(node, key):  # reading one key resolves only its own interpolation
        v = node[key]
        return OmegaConf.to_container(v) if OmegaConf.is_config(v) else v

    return {group: {k: value(node, k) for k in node if known(node, k)} for group, node in nodes.items()}


def with_yaml_settings(given: dict[str, dict | None]) -> dict[str, dict]:
    """Each settings group given over the YAML's values of it; one error naming every world setting left out."""
    out = {group: {**yaml_settings()[group], **(plain(value) if value else {})} for group, value in given.items()}
    missing = [f"task.{group}.{key}" for group, key in WORLD_SETTINGS if out[group].get(key) is None]
    if missing:
        raise ValueError(f"DistillTask: {', '.join(missing)} not set (conf/task/distill.yaml takes them from the "
                         "world's `training` block)")
    return out


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """No parameter of `module` requires grad inside the block, so no graph is built through it."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


class SampleNoise:
    """A NoiseBank per sample: the tensor at an address is the stack of each sample's own NoiseBank tensor, so a
    sample's noise does not depend on the batch it is drawn in."""

    def __init__(self, seeds: list[int]):
        self.banks = [NoiseBank(s) for s in seeds]

    def noise(self, kind: str, step: int, block: int, shape, device=None, dtype=torch.float32) -> torch.Tensor:
        if shape[0] != len(self.banks):
            raise ValueError(f"batch of {shape[0]} samples but noise for {len(self.banks)}")
        return torch.cat([b.noise(kind, step, block, (1, *shape[1:]), device, dtype) for b in self.banks])


def chord_x0(x_a: torch.Tensor, x_b: torch.Tensor, sigma_a: float, sigma_b: float) -> torch.Tensor:
    """The x0 that the chord from x_a (sigma_a) to x_b (sigma_b) of a teacher ODE trajectory extrapolates to."""
    velocity = (x_b.double() - x_a.double()) / (sigma_b - sigma_a)
    return (x_a.double() - sigma_a * velocity).to(x_a.dtype)


def load_world_model(config: dict, checkpoint: str | None, which: str = "auto",
                     dtype: torch.dtype | None = None) -> WanDiT:
    """A world's model preset, with weights from `checkpoint` (any format src.checkpoints reads) when given; `which`
    picks the weights of a training checkpoint (generator_ema / generator / critic / model; auto: EMA if present);
    `dtype` (None: the checkpoint's) is the one the weights are loaded straight into, never materialised in fp32 first."""
    cfg = model_config(config)
    if checkpoint:
        return load_dit(checkpoint, which=which, config=cfg, dtype=dtype)
    model = WanDiT(cfg)
    return model if dtype is None else model.to(dtype)


class DistillTask(L.LightningModule):
    def __init__(
        self,
        world: dict,
        sampler: dict,
        generator_init: str | None = None,
        generator_init_which: str = "auto",
        export_dir: str | None = None,
        num_frames: int = 21,
        gen_update_ratio: int = 5,
        min_exit_step: int = 0,
        dmd: dict | None = None,
        fkl: dict | None = None,
        optim: dict | None = None,
        ema: dict | None = None,
        seed: int = 0,
        grad_accumulation: int = 1,
        nonfinite: dict | None = None,
        teacher_dtype: str = "float32",
        cache_gradient: str = "detached",
    ):
        super().__init__()
        world = plain(world)
        # nonfinite: K non-finite optimizer steps in a row stop the run; past a fraction of non-finite DMD gradient
        # elements the run stops (a few come from mean|x - real| = 0 samples, a broken teacher or critic gives all)
        settings = with_yaml_settings({"dmd": dmd, "fkl": fkl, "optim": optim, "ema": ema, "nonfinite": nonfinite})
        dmd, fkl, optim, nonfinite = settings["dmd"], settings["fkl"], settings["optim"], settings["nonfinite"]
        ema = {"device": None, **settings["ema"]}  # device None: beside the generator
        sampler = plain(sampler)
        if fkl["attention"] not in FKL_ATTENTION:
            raise ValueError(f"fkl.attention must be one of {FKL_ATTENTION}, got {fkl['attention']!r}")
        if dmd["sigma_lookup"] not in SIGMA_LOOKUPS:
            raise ValueError(f"dmd.sigma_lookup must be one of {SIGMA_LOOKUPS}, got {dmd['sigma_lookup']!r}")
        if cache_gradient not in CACHE_GRADIENTS:
            raise ValueError(f"cache_gradient must be one of {CACHE_GRADIENTS}, got {cache_gradient!r}")
        if teacher_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"teacher_dtype must be float32, bfloat16 or float16, got {teacher_dtype!r}")
        if int(grad_accumulation) < 1:
            raise ValueError(f"grad_accumulation must be >= 1, got {grad_accumulation}")
        if not 1 <= int(fkl["num_steps"]) <= 4:
            raise ValueError("fkl.num_steps must be 1..4 (the saved trajectory has 4 chords)")
        self.save_hyperparameters({
            "world": world, "sampler": sampler, "generator_init": generator_init,
            "generator_init_which": generator_init_which, "export_dir": export_dir,
            "num_frames": num_frames, "gen_update_ratio": gen_update_ratio, "min_exit_step": min_exit_step,
            "dmd": dmd, "fkl": fkl, "optim": optim, "ema": ema, "seed": seed, "grad_accumulation": int(grad_accumulation),
            "nonfinite": nonfinite, "teacher_dtype": teacher_dtype, "model_config": model_config(world["student"]).to_dict(),
            "cache_gradient": cache_gradient,
        })
        self.automatic_optimization = False
        self.strict_loading = False  # the frozen teacher is not stored in our checkpoints (on_load_checkpoint checks)
        self.unsaved_groups = ("teacher",)
        self.sampler_cfg = SamplerConfig(**sampler)
        if self.sampler_cfg.order not in ROLLOUT_ORDERS:
            raise ValueError(f"sampler.order must be one of {ROLLOUT_ORDERS} for a training rollout, "
                             f"got {self.sampler_cfg.order!r}")
        if num_frames % self.sampler_cfg.frames_per_block:
            raise ValueError(f"num_frames={num_frames} is not a multiple of frames_per_block")
        if not 0 <= min_exit_step < self.sampler_cfg.num_steps:
            raise ValueError(f"min_exit_step must lie in [0, {self.sampler_cfg.num_steps})")

        base = world.get("critic_init") or world.get("teacher_checkpoint")
        base_which = world.get("critic_init_which", "auto")
        self.teacher = load_world_model(world["teacher"], world.get("teacher_checkpoint"),
                                        dtype=getattr(torch, teacher_dtype)).eval().requires_grad_(False)
        self.critic = load_world_model(world["critic"], base, base_which, torch.float32)  # fp32 master weights
        if generator_init:
            verify_artifact(generator_init)  # the ODE init's files are those its manifest records
            self.generator = load_world_model(world["student"], generator_init, generator_init_which, torch.float32)
        else:
            self.generator = load_world_model(world["student"], base, base_which, torch.float32)
        self.ema: GeneratorEMA | None = None  # not a submodule: never moved or cast by Lightning
        self.text_encoder = hydra.utils.instantiate(world["text_encoder"]).requires_grad_(False)
        self.codec = hydra.utils.instantiate(world["codec"])
        self.latent_shape = (world["latent"]["channels"], world["latent"]["height"], world["latent"]["width"])
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.guard = NonFiniteGuard(self, nonfinite["max_consecutive_skips"], ("generator", "critic"))
        self.dmd_nonfinite = 0  # non-finite DMD gradient elements zeroed in the current iteration
        self.exported: list[Path] | None = None  # the export's files, once written (export)

    # ------------------------------------------------------------------------------------------- pieces

    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional, unconditional = negative prompt) embeddings on this module's device."""
        cond, _ = self.text_encoder.encode(list(prompts))
        uncond, _ = self.text_encoder.encode([self.hparams.world.get("negative_prompt", "")] * len(prompts))
        return cond.to(self.device), uncond.to(self.device)

    def draw_exit_step(self, purpose: str) -> int:
        """Uniform in [min_exit_step, S-1]; a function of (seed, iteration), hence the same on every rank."""
        low, high = self.hparams.min_exit_step, self.sampler_cfg.num_steps
        g = torch.Generator().manual_seed(derived_seed(self.hparams.seed, int(self.iteration), purpose))
        return int(torch.randint(low, high, (1,), generator=g))

    def positions(self, micro: int, size: int) -> list[int]:
        """Indices in this iteration's global batch of the `size` samples of micro-batch `micro` on this rank:
        (micro * world_size + rank) * size + j."""
        world = self.trainer.world_size if self._trainer is not None else 1
        first = (micro * world + self.global_rank) * size
        return list(range(first, first + size))

    def sample_seeds(self, purpose: str, positions: list[int] | None, batch_size: int) -> list[int]:
        """One seed per sample, from (seed, iteration, purpose, global sample index); positions None: 0..B-1."""
        positions = range(batch_size) if positions is None else positions
        return [derived_seed(self.hparams.seed, int(self.iteration), purpose, i) for i in positions]

    def rollout(self, model: WanDiT, context: torch.Tensor, exit_step: int | None, purpose: str,
                positions: list[int] | None = None) -> torch.Tensor:
        """The generator's own video, x0 at the exit step, in the sampler's order (its rollout schedule)."""
        bank = SampleNoise(self.sample_seeds(purpose, positions, context.shape[0]))
        return sample(model, context, self.hparams.num_frames, self.latent_shape, self.sampler_cfg, bank,
                      exit_step=exit_step, cache_gradient=self.hparams.cache_gradient)

    def noisy(self, x: torch.Tensor, purpose: str, positions: list[int] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DMD/critic noise level: t uniform, shifted, clamped; the same t for every frame of a sample."""
        d = self.hparams.dmd
        ts, noises = [], []
        for seed in self.sample_seeds(purpose, positions, x.shape[0]):
            g = torch.Generator().manual_seed(seed)
            ts.append(sample_training_timesteps(1, d["shift"], generator=g, low=d["t_min"], high=d["t_max"]))
            noises.append(torch.randn(x.shape[1:], generator=g))
        t = torch.cat(ts).to(x.device)
        noise = torch.stack(noises).to(device=x.device, dtype=x.dtype)
        return add_noise(x, noise, self.sigma_timesteps(t, "generator")), noise, t

    def sigma_timesteps(self, t: torch.Tensor, wrapper: str) -> torch.Tensor:
        """The timesteps whose exact sigma is the one `dmd.sigma_lookup` gives t: t itself ("exact"), or the sigma the
        official code looks up on its 1000-point grid ("official_grid"): shifted by `sampler.shift` for the noising and
        the critic's flow target (the generator's scheduler), by `dmd.score_shift` in the real/fake score wrappers."""
        d = self.hparams.dmd
        shift = self.sampler_cfg.shift if wrapper == "generator" else d["score_shift"]
        return lookup_timesteps(t, d["sigma_lookup"], shift)

    @torch.no_grad()
    def dmd_gradient(self, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                     positions: list[int] | None = None) -> torch.Tensor:
        """(fake - real) / mean|x - real|: the normalised DMD gradient with respect to x (hiar_method.md §7).

        Officially nan_to_num'ed; here non-finite elements are counted (`train/dmd_nonfinite`) and zeroed only while
        they stay under `nonfinite.dmd_max_fraction` of the elements: a NaN teacher or critic fails the run instead of
        turning the DMD loss into a silent 0."""
        x_t, _, t = self.noisy(x, "dmd_noise", positions)
        ts = self.sigma_timesteps(t, "score")
        real_c = x0_from_velocity(x_t, self.teacher(x_t, t, cond), ts)
        real_u = x0_from_velocity(x_t, self.teacher(x_t, t, uncond), ts)
        real = real_c + self.hparams.dmd["guidance"] * (real_c - real_u)
        fake = x0_from_velocity(x_t, self.critic(x_t, t, cond), ts)
        scale = (x - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        grad = (fake - real) / scale
        if is_fake(grad):  # a shape-only run (src.perf.estimate): there are no values to check
            return grad
        bad = ~torch.isfinite(grad)
        count = int(bad.sum())
        self.dmd_nonfinite = count
        too_many = count > self.hparams.nonfinite["dmd_max_fraction"] * grad.numel()
        if self._trainer is not None:  # every rank stops together (no rank left waiting in a collective)
            too_many = self.trainer.strategy.reduce_boolean_decision(too_many, all=False)
        if too_many:
            raise NonFiniteError(
                f"DMD gradient at iteration {int(self.iteration)}: {count} of {grad.numel()} elements are not finite "
                f"(teacher output finite: {bool(torch.isfinite(real).all())}, critic output finite: "
                f"{bool(torch.isfinite(fake).all())}); limit nonfinite.dmd_max_fraction="
                f"{self.hparams.nonfinite['dmd_max_fraction']}")
        return grad.masked_fill(bad, 0.0)

    def dmd_loss(self, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                 positions: list[int] | None = None) -> torch.Tensor:
        grad = self.dmd_gradient(x.detach(), cond, uncond, positions)
        return 0.5 * F.mse_loss(x.double(), (x.double() - grad.double()).detach())

    def critic_loss(self, x: torch.Tensor, cond: torch.Tensor, positions: list[int] | None = None) -> torch.Tensor:
        """Flow matching of the fake score on the generator's samples: v_pred vs noise - x."""
        x_t, noise, t = self.noisy(x.detach(), "critic_noise", positions)
        v = self.critic(x_t, t, cond)
        if self.hparams.dmd["sigma_lookup"] != "exact":  # the official flow: the score wrapper's x0, back on the
            x0 = x0_from_velocity(x_t, v, self.sigma_timesteps(t, "score"))  # generator's grid
            v = velocity_from_x0(x_t, x0, self.sigma_timesteps(t, "generator"))
        return F.mse_loss(v.float(), (noise - x).float())

    def fkl_loss(self, trajectory: torch.Tensor, sigmas: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Forward-KL regulariser: from teacher ODE state i (sigma_i), the student's x0 must match the x0 that the
        teacher's chord i -> i+1 extrapolates to, for the first fkl.num_steps chords (1 = the paper: pure noise at
        t = 1000). trajectory [B, K, F, C, h, w]; sigmas [K]."""
        f = self.hparams.fkl
        fpb = None if f["attention"] == "bidirectional" else self.sampler_cfg.frames_per_block
        losses = []
        for i in range(int(f["num_steps"])):
            x_a, x_b = trajectory[:, i], trajectory[:, i + 1]
            sigma_a, sigma_b = float(sigmas[i]), float(sigmas[i + 1])
            t = torch.full((x_a.shape[0],), 1000.0 * sigma_a, device=x_a.device)
            x0 = x0_from_velocity(x_a, self.generator(x_a, t, cond, frames_per_block=fpb), t)
            losses.append(F.mse_loss(x0.float(), chord_x0(x_a, x_b, sigma_a, sigma_b).float()))
        return torch.stack(losses).mean()

    @torch.no_grad()
    def update_ema(self):
        """From iteration `ema.start`: the first call copies the fp32 master weights, later ones average them in."""
        e = self.hparams.ema
        if int(self.iteration) < e["start"]:
            return
        if self.ema is None:
            self.ema = GeneratorEMA(self.generator, e["decay"], e["device"])
        else:
            self.ema.update(self.generator)

    @property
    def generator_ema(self) -> WanDiT | None:
        """The averaged generator as a WanDiT (float32, on the EMA's device), or None before ema.start."""
        return None if self.ema is None else self.ema.module(self.generator)

    # ------------------------------------------------------------------------------------------- training

    def backward_for(self, optimizer, loss: torch.Tensor) -> None:
        """manual_backward that names the optimizer whose model `loss` trains: Lightning's Strategy.backward takes the
        optimizer (manual_backward passes None), and a strategy that syncs or shards each model on its own
        (src/distributed) routes the backward by it."""
        self._verify_is_manual_optimization("backward_for")
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer.optimizer
        self.trainer.strategy.backward(loss, optimizer)

    def micro_batches(self, batch: dict) -> list[tuple[dict, list[int]]]:
        """The batch cut into `grad_accumulation` micro-batches, each with its samples' global indices."""
        n, a = len(batch["critic_prompt" if "critic_prompt" in batch else "prompt"]), self.hparams.grad_accumulation
        if n % a:
            raise ValueError(f"batch of {n} samples is not divisible into grad_accumulation={a} micro-batches")
        size = n // a
        return [({k: v[i * size:(i + 1) * size] for k, v in batch.items()}, self.positions(i, size)) for i in range(a)]

    def update(self, optimizer, micro_batches: list[tuple[dict, list[int]]], loss_fn, name: str
               ) -> dict[str, torch.Tensor]:
        """One optimizer step over the micro-batches: loss_fn(micro_batch, positions) -> (loss, logged parts); each loss
        / #micro-batches is backpropagated at once (one micro-batch's activations alive at a time), then clip and step.
        A non-finite loss or gradient norm (on any rank) skips the step (NonFiniteGuard). Returns each logged part
        averaged over the micro-batches, i.e. over this rank's batch."""
        optimizer.zero_grad(set_to_none=True)
        logs: dict[str, torch.Tensor] = {}
        finite = True
        for micro, positions in micro_batches:
            loss, parts = loss_fn(micro, positions)
            finite = finite and bool(torch.isfinite(loss))
            self.backward_for(optimizer, loss / len(micro_batches))
            for key, value in parts.items():
                logs[key] = logs.get(key, 0.0) + value.detach() / len(micro_batches)
            del loss, parts  # the graph goes now, not during the next micro-batch or the step
        params = [p for group in optimizer.param_groups for p in group["params"]]
        # the norm before clipping; under DeepSpeed the gradients live in the engine (0 here: only the loss is checked)
        grad_norm = self.guard.grad_norm(params)
        if not self.guard.step_allowed(self, finite, grad_norm, name):
            drop_gradients(params)  # the step below is then a no-op: the optimizer-step count stays in line
        else:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.optim["grad_clip"],
                                gradient_clip_algorithm="norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # this model's gradients are not kept through the other model's update
        return logs

    def generator_loss(self, batch: dict, positions: list[int], exit_step: int) -> tuple[torch.Tensor, dict]:
        cond, uncond = self.encode_text(batch["prompt"])
        with frozen(self.critic):
            x = self.rollout(self.generator, cond, exit_step, "generator", positions)
            loss_dmd = self.dmd_loss(x, cond, uncond, positions)
            loss, parts = loss_dmd, {"train/dmd": loss_dmd}
            if self.hparams.fkl["weight"] > 0:
                # the forward-KL batch is its own stream (DistillDataModule): its prompts are the trajectories'
                fkl_cond = cond if "trajectory_prompt" not in batch else self.encode_text(batch["trajectory_prompt"])[0]
                loss_fkl = self.fkl_loss(batch["trajectory"], batch["sigmas"][0], fkl_cond)
                loss = loss + self.hparams.fkl["weight"] * loss_fkl
                parts["train/fkl"] = loss_fkl
        return loss, parts

    def critic_update_loss(self, batch: dict, positions: list[int], exit_step: int) -> tuple[torch.Tensor, dict]:
        cond, _ = self.encode_text(batch.get("critic_prompt", batch.get("prompt")))  # the critic's own batch
        with frozen(self.generator):
            x = self.rollout(self.generator, cond, exit_step, "critic", positions)
        loss = self.critic_loss(x, cond, positions)
        return loss, {"train/critic": loss}

    def check_position(self, batch: dict) -> dict:
        """Drops the stream's position tags after checking they are this iteration's and these samples'."""
        batch = dict(batch)
        iteration, index = batch.pop("iteration", None), batch.pop("index", None)
        if self._trainer is not None and self.trainer.overfit_batches:
            return batch  # debug=overfit: the stream repeats its first batch on purpose
        if iteration is not None and int(iteration) != int(self.iteration):
            raise RuntimeError(f"data stream at iteration {int(iteration)}, task at {int(self.iteration)}")
        size = len(batch["critic_prompt" if "critic_prompt" in batch else "prompt"])
        if index is not None:
            a = self.hparams.grad_accumulation
            expected = [p for m in range(a) for p in self.positions(m, size // a)]
            if index.tolist() != expected:
                raise RuntimeError(f"data stream gave global samples {index.tolist()}, this rank trains {expected}")
        return batch

    def on_train_batch_start(self, batch, batch_idx) -> None:
        # Lightning keeps a step metric's last value until the epoch ends: forget what the last training_step logged,
        # so that a critic-only row of metrics.csv leaves the generator's losses empty instead of repeating them
        for result in self.trainer._results.values():
            if result.meta.fx == "training_step" and not result.meta.on_epoch:
                result.reset()

    def training_step(self, batch, batch_idx):
        opt_generator, opt_critic = self.optimizers()
        micro = self.micro_batches(self.check_position(batch))
        logs = {}
        self.dmd_nonfinite = 0
        if int(self.iteration) % self.hparams.gen_update_ratio == 0:
            exit_step = self.draw_exit_step("generator")
            logs.update(self.update(opt_generator, micro, lambda b, pos: self.generator_loss(b, pos, exit_step),
                                    "generator"))
            self.update_ema()
            logs["train/exit_step"] = float(exit_step)
            logs["train/dmd_nonfinite"] = float(self.dmd_nonfinite)
        exit_step = self.draw_exit_step("critic")
        logs.update(self.update(opt_critic, micro, lambda b, pos: self.critic_update_loss(b, pos, exit_step), "critic"))
        logs["train/nonfinite_skips"] = self.nonfinite_skips.float()
        # sync_dist: the logged losses are those of the global batch (the mean of the ranks' means)
        self.log_dict(logs, prog_bar=True, batch_size=len(micro[0][0].get("critic_prompt", micro[0][0].get("prompt")))
                      * len(micro), sync_dist=True)
        self.iteration += 1

    def configure_optimizers(self):
        o = self.hparams.optim
        betas = tuple(float(b) for b in o["betas"])  # AdamW refuses int betas (YAML `0`)

        def adamw(params, lr):
            return torch.optim.AdamW(params, lr=float(lr), betas=betas, weight_decay=float(o["weight_decay"]))

        return [adamw(self.generator.parameters(), o["lr_generator"]), adamw(self.critic.parameters(), o["lr_critic"])]

    # ------------------------------------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]
        if self.ema is not None:  # fp32, under the names load_dit(which="generator_ema") reads
            state.update({f"generator_ema.{k}": v for k, v in self.ema.state_dict().items()})
        checkpoint[TASK_KEY] = task_record(self, state)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_checkpoint_task(self, checkpoint, optional=("generator_ema",))
        state = checkpoint["state_dict"]
        prefix = "generator_ema."
        ema = {k[len(prefix):]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
        if ema:
            self.ema = GeneratorEMA.from_state_dict(ema, self.hparams.ema["decay"], self.hparams.ema["device"])

    def export_folder(self) -> Path:
        return Path(self.hparams.export_dir or self.trainer.default_root_dir)

    def on_fit_start(self) -> None:
        if self.trainer.is_global_zero:
            clean_partial(self.export_folder())

    def on_train_end(self) -> None:
        self.export()

    def export(self) -> list[Path]:
        """Export {generator, critic, generator_ema} in the official layout (fp32 master weights, gathered on every rank
        under sharding strategies) and the sampling weights (the fp32 EMA once started) as safetensors; each
        atomically with a checksum, refused if any weight is not finite, and refused whole if every generator update
        was skipped. Once per process, from on_train_end or, after a resume that had nothing left to train (Lightning
        then skips on_train_end), from src.train; returns the files the export holds (rank 0; [] elsewhere)."""
        if self.exported is not None:
            return self.exported
        ratio = self.hparams.gen_update_ratio
        self.guard.require_some_step(self, (int(self.iteration) + ratio - 1) // ratio, "generator")
        keep = self.trainer.is_global_zero
        states = {name: {k: v.cpu() for k, v in master_parameters(getattr(self, name)) if keep}
                  for name in ("generator", "critic")}
        if not keep:
            self.exported = []
            return self.exported
        if self.ema is not None:
            states["generator_ema"] = self.ema.state_dict()
        out = self.export_folder()
        files = [save_finite(out / "model.pt", states, lambda tmp: export_training_checkpoint(tmp, **states))]
        with torch.device("meta"):
            student = WanDiT(self.generator.cfg)
        student.load_state_dict(states.get("generator_ema", states["generator"]), assign=True)
        files.append(save_finite(out / "student.safetensors", student, lambda tmp: save_dit(student, tmp)))
        self.exported = [f for path in files for f in (path, Path(str(path) + CHECKSUM_SUFFIX))]
        return self.exported

    # ------------------------------------------------------------------------------------------- sampling

    def sampling_model(self) -> WanDiT:
        return self.generator if self.ema is None else self.ema.module(self.generator, self.device)

    @torch.no_grad()
    def sample_videos(self, prompts: list[str], num_frames: int, seed: int) -> torch.Tensor:
        """The drift callback's protocol: pixels [B, T, 3, H, W] in [-1, 1] from the EMA generator (if started),
        sampled in the order the student is trained in (block-first for Self-Forcing)."""
        cond, _ = self.encode_text(prompts)
        latents = sample(self.sampling_model(), cond, num_frames, self.latent_shape, self.sampler_cfg,
                         NoiseBank(seed))
        return self.codec.decode(latents)
