"""The official numerics on request (issue 28, docs/fidelity.md): the gradient through the cached K/V against an explicit
concatenated cache written with plain torch ops, the official sigma grid against its formula, the switches' wiring."""

import copy

import pytest
import torch
import torch.nn.functional as F

from src.distributed.parallelize import checkpoint_blocks
from src.flow_matching import grid_sigma, lookup_timesteps, official_grid, x0_from_velocity
from src.models.kv_cache import KVCache
from src.models.wan import WanDiT, rope_tables
from src.perf.estimate import compose
from src.sampling.noise import NoiseBank
from src.sampling.orders import SamplerConfig, sample
from src.sampling.primitive import next_input
from src.training.distill import DistillTask

from helpers import SAMPLER, tiny_world

LATENT = (4, 4, 4)  # the tiny_model's latents: 4 tokens per frame


class ExplicitCache:
    """The reference cache: per layer, a list of the cached blocks' (context K, context V, exit K, exit V)."""

    def __init__(self, layers: int, official: bool):
        self.blocks = [[] for _ in range(layers)]
        self.official = official
        self.exit = [None] * layers

    def keys_values(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Earlier blocks' context K/V -- with the exit-step K/V's gradient path when official -- then the chunk."""
        def link(value, exit_):
            return value + (exit_ - exit_.detach()) if self.official else value

        ks = [link(ck, ek) for ck, _, ek, _ in self.blocks[layer]]
        vs = [link(cv, ev) for _, cv, _, ev in self.blocks[layer]]
        return torch.cat(ks + [k], 1), torch.cat(vs + [v], 1)


class ExplicitForward:
    """The `attn` of one forward over one block through an ExplicitCache: "exit" (with grad: remembers its K/V) or
    "write" (without grad: appends its K/V as the block's context, paired with the block's exit K/V)."""

    def __init__(self, cache: ExplicitCache, kind: str):
        self.cache, self.kind = cache, kind

    def attend(self, layer, q, k, v):
        keys, values = self.cache.keys_values(layer, k, v)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2))
        if self.kind == "exit":
            self.cache.exit[layer] = (k, v)
        else:
            self.cache.blocks[layer].append((k.detach(), v.detach(), *self.cache.exit[layer]))
        return out.transpose(1, 2)

    def text_kv(self, layer, cross_attn, text):
        return cross_attn.text_kv(text)


def explicit_velocity(model: WanDiT, x, t: float, context, start_frame: int, attn) -> torch.Tensor:
    tokens, e, e0, (h, w) = model.embed(x, torch.full(x.shape[:2], float(t)))
    rope = rope_tables(model.cfg.head_dim, start_frame, x.shape[1], h, w, x.device)
    tokens = model.run_blocks(tokens, e0, model.embed_text(context), rope, attn)
    return model.unpatchify(model.head(tokens, e), x)


def explicit_rollout(model: WanDiT, context, cfg: SamplerConfig, bank: NoiseBank, blocks: int, official: bool):
    """Exit step 0 of a 3-block rollout (every block denoised once with grad, then its context written without grad),
    with the cache as explicit tensors: step-first writes x0 re-noised to t_1, block-first the clean x0 at t = 0."""
    cache = ExplicitCache(model.cfg.num_layers, official)
    fpb, (t0, t1) = cfg.frames_per_block, cfg.timesteps[:2]
    shape = (context.shape[0], fpb, *LATENT)
    outs = []
    for n in range(blocks):
        x = bank.noise("init", 0, n, shape)
        v = explicit_velocity(model, x, t0, context, n * fpb, ExplicitForward(cache, "exit"))
        x0 = x0_from_velocity(x, v, torch.full(x.shape[:2], t0).double())
        outs.append(x0)
        if cfg.order == "step_first":
            ctx, t_ctx = next_input(x, x0.detach(), v.detach(), t0, t1, bank.noise("renoise", 0, n, shape)), t1
        else:
            ctx, t_ctx = x0.detach(), 0.0
        with torch.no_grad():
            explicit_velocity(model, ctx, t_ctx, context, n * fpb, ExplicitForward(cache, "write"))
    return torch.cat(outs, 1)


def gradient(model, x, weights) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    (x * weights).sum().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("order", ["step_first", "block_first"])
def test_official_cache_gradient_equals_an_explicit_concatenated_cache(tiny_model, order):
    torch.manual_seed(3)
    model = tiny_model.train()
    context = torch.randn(1, model.cfg.text_len, model.cfg.text_dim)
    cfg = SamplerConfig(order=order)
    weights = torch.randn(1, 9, *LATENT, dtype=torch.float64)
    grads, xs = {}, {}
    for official in (False, True):
        reference = explicit_rollout(model, context, cfg, NoiseBank(0), 3, official)
        grads["reference", official] = gradient(model, reference, weights)
        for checkpointing in (False, True):  # the official code runs only under checkpointing; ours either way
            net = checkpoint_blocks(copy.deepcopy(model)) if checkpointing else model  # applied from outside
            mode = "official" if official else "detached"
            x = sample(net, context, 9, LATENT, cfg, NoiseBank(0), exit_step=0, cache_gradient=mode)
            xs[mode, checkpointing] = x.detach()
            grads[mode, checkpointing] = gradient(net, x, weights)
    # the forward is bit for bit the same in both modes
    assert all(torch.equal(x, xs["detached", False]) for x in xs.values())
    for checkpointing in (False, True):
        assert relative(grads["official", checkpointing], grads["reference", True]) < 1e-5
        assert relative(grads["detached", checkpointing], grads["reference", False]) < 1e-5
    # and the gradients differ: later blocks' loss reaches earlier blocks' exit-step K/V projections
    assert relative(grads["official", False], grads["detached", False]) > 1e-3


def test_official_mode_adds_only_the_paths_from_later_blocks_into_earlier_exit_forwards(tiny_model):
    """Block 0's loss alone (nothing it reads was cached) gives the same gradient in both modes; block 1's loss alone
    differs (in official mode it also reaches block 0's exit-step K/V)."""
    torch.manual_seed(4)
    model = tiny_model.train()
    context = torch.randn(1, model.cfg.text_len, model.cfg.text_dim)
    cfg = SamplerConfig(order="step_first")
    grads = {}
    for mode in ("detached", "official"):
        for block in (0, 1):
            x = sample(model, context, 6, LATENT, cfg, NoiseBank(0), exit_step=0, cache_gradient=mode)
            weights = torch.zeros_like(x)
            weights[:, 3 * block:3 * block + 3] = 1.0
            grads[mode, block] = gradient(model, x, weights)
    assert torch.equal(grads["detached", 0], grads["official", 0])
    assert relative(grads["official", 1], grads["detached", 1]) > 1e-3


def test_taps_hold_no_storage_and_go_at_reset():
    cache = KVCache(1, cache_gradient="official")
    cache.tpf = 2
    k = torch.randn(1, 4, 2, 8, requires_grad=True)
    cache.tap(0, 5, k, k * 2)
    assert sorted(cache.grad_taps[0]) == [5, 6]
    tap_k, _ = cache.grad_taps[0][5]
    assert tap_k.shape == (1, 2, 2, 8) and tap_k.stride() == (0, 0, 0, 0) and not tap_k.any()
    tap_k.sum().backward()
    assert torch.equal(k.grad[:, :2], torch.ones(1, 2, 2, 8)) and not k.grad[:, 2:].any()
    cache.reset()
    assert cache.grad_taps == [{}]
    with pytest.raises(ValueError, match="cache_gradient"):
        KVCache(1, cache_gradient="straight")


def official_formula_sigma(t: float, shift: float) -> float:
    """The official FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True).set_timesteps(1000) and the wrappers'
    argmin lookup, written out: float32 sigmas linspace(1, 0, 1001)[:-1], shifted; timesteps = 1000 sigmas."""
    sigmas = torch.linspace(1.0, 0.0, 1001)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = (sigmas * 1000).tolist()
    best = min(range(1000), key=lambda i: (abs(timesteps[i] - t), i))
    return float(sigmas[best])


@pytest.mark.parametrize("shift", [5.0, 8.0])
def test_official_grid_is_the_official_formula(shift):
    t = torch.tensor([1000.0, 999.9, 980.0, 937.5, 833.3334, 625.0, 500.0, 123.4, 50.0, 20.0, 3.0, 0.0])
    expected = torch.tensor([official_formula_sigma(float(v), shift) for v in t], dtype=torch.float64)
    assert torch.equal(grid_sigma(t, shift), expected)
    assert torch.equal(grid_sigma(t.reshape(3, 4), shift), expected.reshape(3, 4))
    timesteps, sigmas = official_grid(shift)
    assert timesteps.dtype == sigmas.dtype == torch.float32 and len(sigmas) == 1000 and sigmas[0] == 1.0
    assert torch.equal(lookup_timesteps(t, "exact", shift), t)
    assert torch.allclose(lookup_timesteps(t, "official_grid", shift), 1000 * expected, rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="sigma lookup"):
        lookup_timesteps(t, "nearest", shift)


def test_official_grid_size_of_the_error():
    """The grid's sigma error |sigma_grid / (t / 1000) - 1| over the DMD range t in [20, 980]: at most 17.5 % (at t = 20)
    on the score wrappers' shift-8 grid, 6.8 % from t = 50, 1.3 % above t = 200; 10.5 / 4.3 / 0.8 % on the
    generator's shift-5 grid; none on the student's own steps (they are grid points)."""
    assert grid_sigma(torch.tensor([20.0]), 8.0).item() / 0.02 - 1 == pytest.approx(0.175, abs=0.001)
    t = torch.arange(20.0, 980.25, 0.25, dtype=torch.float64)
    for shift, sizes in ((8.0, (0.1753, 0.0677, 0.0132)), (5.0, (0.1052, 0.0432, 0.0082))):
        error = (grid_sigma(t, shift) / (t / 1000) - 1).abs()
        measured = (error.max(), error[t >= 50].max(), error[t > 200].max())
        assert [round(float(m), 4) for m in measured] == list(sizes)
    student_steps = torch.tensor(SamplerConfig().timesteps)  # 1000, 937.5, 833.3, 625 at shift 5: grid points
    assert torch.allclose(grid_sigma(student_steps, 5.0), student_steps.double() / 1000, rtol=1e-7)


def make_task(teacher_file, **kw):
    return DistillTask(world=tiny_world(teacher_file), sampler=SAMPLER, num_frames=9,
                       optim={"lr_generator": 1e-3, "lr_critic": 1e-3}, ema={"start": 0}, **kw)


def written_out_dmd_gradient(task, x, x_t, t, sigma, cond, uncond):
    """The DMD gradient as the official wrappers compute it, with x0 = x_t - sigma v for teacher (CFG 3) and critic."""
    real_c = x_t.double() - sigma * task.teacher(x_t, t, cond).double()
    real_u = x_t.double() - sigma * task.teacher(x_t, t, uncond).double()
    real = real_c + 3.0 * (real_c - real_u)
    fake = x_t.double() - sigma * task.critic(x_t, t, cond).double()
    return (fake - real) / (x.double() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)


def test_official_grid_losses_are_the_official_wrappers(teacher_file):
    """DMD and critic with sigma_lookup official_grid equal the official wrappers' formulas, written out here: noise on
    the generator's shift-5 grid, score x0 = x_t - sigma_8 v, the critic's flow (x_t - x0_fake) / sigma_5."""
    task = make_task(teacher_file, dmd={"sigma_lookup": "official_grid"})
    torch.manual_seed(0)
    x = torch.randn(2, 9, 12, 4, 4)
    cond, uncond = task.encode_text(["a red circle", "a blue square"])
    x_t, noise, t = task.noisy(x, "dmd_noise")
    s5, s8 = (grid_sigma(t, shift).reshape(-1, 1, 1, 1, 1) for shift in (5.0, 8.0))
    assert torch.allclose(x_t.double(), (1 - s5) * x.double() + s5 * noise.double(), rtol=0, atol=1e-6)
    with torch.no_grad():
        expected = written_out_dmd_gradient(task, x, x_t, t, s8, cond, uncond)
        assert torch.allclose(task.dmd_gradient(x, cond, uncond).double(), expected, rtol=1e-5, atol=1e-6)
        x_t, noise, t = task.noisy(x, "critic_noise")
        s5, s8 = (grid_sigma(t, shift).reshape(-1, 1, 1, 1, 1) for shift in (5.0, 8.0))
        x0_fake = (x_t.double() - s8 * task.critic(x_t, t, cond).double()).float()
        flow = (x_t.double() - x0_fake.double()) / s5
        expected = ((flow.float() - (noise - x)) ** 2).mean()
        assert torch.allclose(task.critic_loss(x, cond), expected, rtol=1e-6)


def test_exact_lookup_is_t_over_1000(teacher_file):
    """The default: x0 = x_t - (t / 1000) v in the DMD gradient, v compared as is in the critic loss."""
    task = make_task(teacher_file)
    assert task.hparams.dmd["sigma_lookup"] == "exact" and task.hparams.cache_gradient == "detached"
    torch.manual_seed(0)
    x = torch.randn(1, 9, 12, 4, 4)
    cond, uncond = task.encode_text(["a red circle"])
    with torch.no_grad():
        x_t, noise, t = task.noisy(x, "critic_noise")
        assert torch.equal(task.critic_loss(x, cond), F.mse_loss(task.critic(x_t, t, cond), noise - x))
        x_t, _, t = task.noisy(x, "dmd_noise")
        expected = written_out_dmd_gradient(task, x, x_t, t, t.double().reshape(-1, 1, 1, 1, 1) / 1000, cond, uncond)
        assert torch.allclose(task.dmd_gradient(x, cond, uncond).double(), expected, rtol=1e-5, atol=1e-6)


def test_bad_switches_fail_before_any_work(teacher_file):
    with pytest.raises(ValueError, match="cache_gradient"):
        make_task(teacher_file, cache_gradient="straight_through")
    with pytest.raises(ValueError, match="dmd.sigma_lookup"):
        make_task(teacher_file, dmd={"sigma_lookup": "grid"})


def test_numerics_group_selects_every_official_behaviour():
    default = compose(["experiment=hiar_fkl"])
    assert (default.task.cache_gradient, default.task.dmd.sigma_lookup, default.task.fkl.attention) == \
        ("detached", "exact", "bidirectional")
    official = compose(["experiment=hiar_fkl", "numerics=official"])
    assert (official.task.cache_gradient, official.task.dmd.sigma_lookup, official.task.fkl.attention) == \
        ("official", "official_grid", "causal")
    assert official.task.dmd.score_shift == 8.0 and official.task.sampler.shift == 5.0
    one = compose(["experiment=hiar_fkl", "numerics=official", "task.cache_gradient=detached"])
    assert (one.task.cache_gradient, one.task.dmd.sigma_lookup) == ("detached", "official_grid")
