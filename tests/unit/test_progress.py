"""The iteration progress bar of a resumed run (ckpt_path=) counts on from the resumed iteration."""

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from callbacks.progress import IterationProgressBar


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Recorded(IterationProgressBar):
    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        self.start = (self.train_progress_bar.n, self.train_progress_bar.total)


def fit(tmp_path, max_steps, ckpt_path=None):
    bar = Recorded(refresh_rate=1)
    trainer = L.Trainer(max_steps=max_steps, callbacks=[bar], logger=False, enable_checkpointing=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=tmp_path)
    trainer.fit(Tiny(), DataLoader(TensorDataset(torch.randn(16, 2)), batch_size=2), ckpt_path=ckpt_path)
    return trainer, bar


def test_a_resumed_run_counts_on_from_its_iteration(tmp_path):
    trainer, bar = fit(tmp_path, 3)
    assert bar.start == (0, 3)
    trainer.save_checkpoint(tmp_path / "three.ckpt")
    trainer, bar = fit(tmp_path, 8, ckpt_path=tmp_path / "three.ckpt")
    assert bar.start == (3, 8) and bar.train_progress_bar.n == 8  # not 0/8 at the start, nor 5/8 at the end
