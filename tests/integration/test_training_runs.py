"""Distillation trained by a Lightning Trainer over many steps on the tiny world: the update ratio, the frozen
teacher, the EMA and the export."""

import lightning as L
import torch

from helpers import DistillBatches, distill_task


def test_update_ratio_frozen_teacher_and_ema(teacher_file, tmp_path):
    task = distill_task(teacher_file)
    teacher_before = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    counts = {"generator": 0, "critic": 0}
    trainer = L.Trainer(max_steps=12, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, enable_model_summary=False)
    original = task.configure_optimizers

    def counted():
        optimizers = original()
        for name, opt in zip(("generator", "critic"), optimizers):
            opt.register_step_post_hook(lambda *_, name=name: counts.__setitem__(name, counts[name] + 1))
        return optimizers

    task.configure_optimizers = counted
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(DistillBatches(), batch_size=None))
    assert counts == {"generator": 2, "critic": 10}  # 10 iterations, a generator update every 5th, 12 optimizer steps
    assert all(torch.equal(teacher_before[k], v) for k, v in task.teacher.state_dict().items())
    assert task.generator_ema is not None  # started at iteration 2
    assert (tmp_path / "model.pt").exists() and (tmp_path / "student.safetensors").exists()
    exported = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(exported) == {"generator", "critic", "generator_ema"}
