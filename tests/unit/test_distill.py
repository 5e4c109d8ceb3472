"""Distillation on tiny models: losses, where gradients flow, forward-KL attention (training over many steps:
tests/integration/test_training_runs.py)."""

import pytest
import torch

from src.flow_matching import warp_steps
from src.training.distill import chord_x0

from helpers import SAMPLER, distill_batch, distill_task


class Recorder:
    """Wraps a model's forward to record (timesteps, grad enabled, cache write, frames_per_block) of every call."""

    def __init__(self, model):
        self.calls, self.model, self.original = [], model, model.forward

        def forward(x, t, context, **kw):
            self.calls.append({"t": torch.as_tensor(t).flatten()[0].item(), "grad": torch.is_grad_enabled(),
                               "write": kw.get("write_cache", False), "fpb": kw.get("frames_per_block"),
                               "cached": kw.get("cache") is not None})
            return self.original(x, t, context, **kw)

        model.forward = forward


@pytest.mark.parametrize("order", ["step_first", "block_first"])
@pytest.mark.parametrize("exit_step", [0, 2, 3])
def test_gradients_reach_only_the_exit_step_forwards(teacher_file, order, exit_step):
    task = distill_task(teacher_file, order)
    recorder = Recorder(task.generator)
    cond, _ = task.encode_text(["a red circle moving left on a gray background"])
    x = task.rollout(task.generator, cond, exit_step, "generator")
    assert x.shape == (1, 9, 12, 4, 4) and x.requires_grad
    t_exit = warp_steps(SAMPLER["steps"]).tolist()[exit_step]
    with_grad = [c for c in recorder.calls if c["grad"]]
    assert len(with_grad) == 3  # one per block
    assert all(c["t"] == pytest.approx(t_exit) and not c["write"] for c in with_grad)
    assert all(not c["grad"] for c in recorder.calls if c["write"])  # cache writes never carry grad
    x.sum().backward()
    assert all(p.grad is not None for p in task.generator.parameters())


def test_one_iteration_of_each_loss(teacher_file):
    task = distill_task(teacher_file)
    b = distill_batch()
    cond, uncond = task.encode_text(b["prompt"])
    x = task.rollout(task.generator, cond, 1, "generator")
    for loss in (task.dmd_loss(x, cond, uncond), task.critic_loss(x, cond),
                 task.fkl_loss(b["trajectory"], b["sigmas"][0], cond)):
        assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0


def test_dmd_gradient_vanishes_when_the_critic_equals_the_teacher(teacher_file):
    """Critic and teacher start from the same weights; without guidance fake == real, so there is nothing to learn."""
    task = distill_task(teacher_file, dmd={"guidance": 0.0})
    x = torch.randn(2, 9, 12, 4, 4)
    cond, uncond = task.encode_text(["a red circle moving left on a gray background"] * 2)
    assert task.dmd_gradient(x, cond, uncond).abs().max() < 1e-4  # fake == real: nothing to learn


def test_forward_kl_uses_full_attention_and_the_chord_target(teacher_file):
    for attention, fpb in (("bidirectional", None), ("causal", 3)):
        task = distill_task(teacher_file, fkl={"attention": attention})
        recorder = Recorder(task.generator)
        b = distill_batch()
        cond, _ = task.encode_text(b["prompt"])
        task.fkl_loss(b["trajectory"], b["sigmas"][0], cond)
        assert [(c["fpb"], c["cached"], c["t"]) for c in recorder.calls] == [(fpb, False, 1000.0)]
    x_a, x_b = torch.randn(3), torch.randn(3)
    assert torch.allclose(chord_x0(x_a, x_b, 1.0, 0.96), x_a + 25 * (x_b - x_a), atol=1e-5)


