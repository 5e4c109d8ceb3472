"""`python -m src.generate ... context=<mp4>`: extend a video that src.generate wrote, from its last latent frames."""

import json
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from src.checkpoints import save_dit
from src.generate import generate
from src.models.wan import WanConfig, WanDiT
from src.video_io import read_video

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a red circle moving left on a black background"


def test_cli_extends_an_mp4_written_by_src_generate(tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.safetensors"
    save_dit(WanDiT(WanConfig(dim=32, ffn_dim=64, freq_dim=32, num_heads=2, num_layers=1, in_dim=12, out_dim=12,
                              text_len=16, text_dim=64)), checkpoint)
    common = [f"checkpoint={checkpoint}", "model_config=null", "sampler.steps=[1000,500]", "device=cpu"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("generate", overrides=[*common, f"prompts={PROMPT}", "num_frames=6",
                                             f"output_dir={tmp_path / 'first'}"])
    [first] = generate(cfg)
    import subprocess

    out = tmp_path / "extended"
    up = "a red circle moving up on a black background"
    result = subprocess.run(
        [sys.executable, "-m", "src.generate", *common, f"prompts={PROMPT} | {up}", "switch_every=3",
         f"context={first}", "context_frames=3", "num_frames=9", f"output_dir={out}",
         f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    [extended] = sorted(out.glob("*.mp4"))
    source, extension = read_video(first)[0], read_video(extended)[0]
    assert extension.shape == (9, 3, 256, 256)  # 3 context frames + 6 new ones, upscaled x16 for viewing
    # the extension starts with the source's last 3 frames (two H.264 round trips apart)
    assert (extension[:3] - source[3:]).abs().mean() < 0.02
    assert (extension[3:] - source[3:].mean(0)).abs().mean() > 0.02  # and goes on with new frames
    settings = json.loads((out / "settings.json").read_text())
    assert settings["context"] == str(first) and settings["context_frames"] == 3
    assert settings["videos"][0]["context"] == {"source_frames": 6, "dropped": 3, "padded": 0, "latent_frames": 3}
    missing = subprocess.run(
        [sys.executable, "-m", "src.generate", *common, f"prompts={PROMPT}", f"context={tmp_path / 'nope.mp4'}",
         f"output_dir={out}", f"hydra.run.dir={tmp_path / 'run2'}"], capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode != 0 and "context file not found" in missing.stderr
