import pytest
import torch

from src import flow_matching as schedule


def test_warped_four_step_list():
    steps = schedule.warp_steps([1000, 750, 500, 250], shift=5.0)
    assert torch.allclose(steps, torch.tensor([1000.0, 937.5, 2500 / 3, 625.0], dtype=torch.float64))


def test_teacher_grid_48_steps_shift_8():
    grid = schedule.euler_grid(48, shift=8.0)
    assert grid.shape == (49,) and grid[0] == 1000 and grid[-1] == 0
    sigmas = grid[[0, 12, 24, 36]] / 1000
    assert torch.allclose(sigmas, torch.tensor([1.0, 0.96, 8 / 9, 8 / 11], dtype=torch.float64))
    assert (grid[1:] < grid[:-1]).all()


def test_noise_velocity_x0_round_trip():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 2, 2, generator=g), torch.randn(2, 3, 4, 2, 2, generator=g)
    t = torch.tensor([[900.0, 500.0, 100.0]] * 2)
    x_t = schedule.add_noise(x0, noise, t)
    v = noise - x0
    assert torch.allclose(schedule.x0_from_velocity(x_t, v, t), x0, atol=1e-6)
    assert torch.allclose(schedule.velocity_from_x0(x_t, x0, t), v, atol=1e-5)
    # an exact velocity carries x_t to x_{t'} on the straight path
    assert torch.allclose(schedule.euler_step(x_t, v, t, t / 2), schedule.add_noise(x0, noise, t / 2), atol=1e-6)


def test_dmd_timesteps_are_shifted_and_clamped():
    t = schedule.sample_training_timesteps(10_000, shift=5.0, generator=torch.Generator().manual_seed(0),
                                           low=20.0, high=980.0)
    assert t.min() >= 20 and t.max() <= 980
    assert (t > 500).float().mean() > 0.75  # shift 5 pushes mass towards high noise


def test_bad_step_list():
    with pytest.raises(ValueError):
        schedule.warp_steps([1200, 500])
