import json
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import pytest
import torch
from hydra import compose, initialize_config_dir

from src.checkpoints import save_dit
from src.generate import generate
from src.io import load_prompts
from src.models.wan import WanConfig, WanDiT
from src.video_io import pixel_format, read_video
from src.worlds.toy.data import write_shards

CONF = str(Path(__file__).resolve().parents[2] / "conf")

# a tiny DiT for the toy world's latents (12 x 8 x 8) and text (16 x 64)
TOY_TINY = WanConfig(dim=32, ffn_dim=64, freq_dim=32, num_heads=2, num_layers=1, in_dim=12, out_dim=12, text_len=16,
                     text_dim=64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_dit(WanDiT(TOY_TINY), path)
    return path


def config(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("generate", overrides=list(overrides))


def test_generate_writes_videos_and_settings(tmp_path, checkpoint):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\n\n a blue square moving up \n")
    cfg = config(f"checkpoint={checkpoint}", "model_config=null", f"prompts={prompts}", "num_frames=6",
                 "sampler=block_first", "sampler.steps=[1000,500]", f"output_dir={tmp_path / 'out'}", "device=cpu")
    files = generate(cfg)
    assert [f.name for f in files] == ["0000_a_red_circle_moving_left.mp4", "0001_a_blue_square_moving_up.mp4"]
    frames = imageio.mimread(str(files[0]))
    assert len(frames) == 6 and frames[0].shape == (256, 256, 3)  # 16 x 16 toy frames, nearest x16
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert settings["sampler"]["order"] == "block_first"
    assert settings["sampler"]["timesteps"] == pytest.approx([1000.0, 2500 / 3])  # 500 warped at shift 5
    assert settings["fps"] == 4 and [v["seed"] for v in settings["videos"]] == [0, 1]
    assert settings["videos"][1]["prompt"] == "a blue square moving up"


def test_load_prompts(tmp_path):
    assert load_prompts("a green triangle") == ["a green triangle"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(str(empty))
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        load_prompts(str(tmp_path / "missing.txt"))
    shards = write_shards(tmp_path / "shards", 3, num_frames=1, videos_per_shard=2)
    from_folder = load_prompts(str(tmp_path / "shards"))
    assert len(from_folder) == 3 and all("moving" in p for p in from_folder)
    assert load_prompts(shards[0], limit=1) == from_folder[:1]


def test_clear_errors(tmp_path, checkpoint):
    with pytest.raises(ValueError, match="num_frames=10 is not a positive multiple of the block size 3"):
        generate(config(f"checkpoint={checkpoint}", "prompts=x", "num_frames=10", f"output_dir={tmp_path}"))
    result = subprocess.run(
        [sys.executable, "-m", "src.generate", f"checkpoint={tmp_path / 'nope.pt'}", "prompts=x",
         f"output_dir={tmp_path}", "hydra.run.dir=" + str(tmp_path / "run")],
        capture_output=True, text=True, cwd=Path(CONF).parent,
    )
    assert result.returncode != 0 and "checkpoint: file not found" in result.stderr


def test_python_api_equals_src_generate(tmp_path, checkpoint):
    """One code path: HiAR.from_checkpoint(...).generate writes the same videos as python -m src.generate, and its
    tensor output is the concatenation of the streamed blocks."""
    from src.api import HiAR

    prompts = ["a red circle moving left on a black background", "a blue square moving up on a gray background"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts))
    cfg = config(f"checkpoint={checkpoint}", "model_config=null", f"prompts={tmp_path / 'prompts.txt'}",
                 "num_frames=6", "sampler.steps=[1000,500]", f"output_dir={tmp_path / 'cli'}", "device=cpu", "seed=3")
    cli_files = generate(cfg)
    pipe = HiAR.from_checkpoint(checkpoint, world="toy", device="cpu",
                                overrides=["model_config=null", "sampler.steps=[1000,500]"])
    api_files = pipe.generate(prompts, num_frames=6, seed=3, out=tmp_path / "api")
    for a, b in zip(cli_files, api_files):
        assert torch.equal(read_video(a)[0], read_video(b)[0])
    video = pipe.generate(prompts, num_frames=6, seed=3)
    assert video.shape == (2, 6, 3, 16, 16)
    second = torch.cat([block.pixels[0] for block in pipe.stream(prompts[1], num_frames=6, seed=4)])
    assert torch.equal(video[1], second)


def test_prompt_schedule(tmp_path, checkpoint):
    """prompts="a | b" switch_every=3: the second block runs under the second prompt (the stream's KV re-cache)."""
    from src.api import HiAR, parse_schedule

    assert parse_schedule("a | b", 3, 6, 3) == {0: "a", 3: "b"}
    with pytest.raises(ValueError, match="set switch_every"):
        parse_schedule("a | b", None, 6, 3)
    with pytest.raises(ValueError, match="multiple of the block size 3"):
        parse_schedule("a | b", 2, 6, 3)
    pipe = HiAR.from_checkpoint(checkpoint, device="cpu", overrides=["model_config=null", "sampler.steps=[1000,500]"])
    left, up = "a red circle moving left on a black background", "a red circle moving up on a black background"
    contexts, forward = [], pipe.model.forward
    pipe.model.forward = lambda x, t, context, **kw: contexts.append(context) or forward(x, t, context, **kw)
    switched = pipe.generate(f"{left} | {up}", num_frames=6, switch_every=3)[0]
    pipe.model.forward = forward
    embedded = {p: pipe.text_encoder.encode([p])[0] for p in (left, up)}
    used = [next(p for p, e in embedded.items() if torch.equal(c, e)) for c in contexts]
    assert used[0] == left and used[-1] == up and set(used) == {left, up}
    only_left = pipe.generate(left, num_frames=6)[0]
    assert torch.equal(switched[:3], only_left[:3])  # the first block never sees the second prompt
    cfg = config(f"checkpoint={checkpoint}", "model_config=null", f"prompts={left} | {up}", "switch_every=3",
                 "num_frames=6", "sampler.steps=[1000,500]", f"output_dir={tmp_path}", "device=cpu")
    [file] = generate(cfg)
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["switch_every"] == 3 and settings["videos"][0]["prompt"] == f"{left} | {up}"
    assert pixel_format(file) == "yuv420p"


def test_api_pixels_are_clamped_as_a_video_file_holds_them(checkpoint):
    """A decoder overshoots [-1, 1] (distilled students more than their ODE init): HiAR.generate and HiAR.stream clamp,
    so the tensors are what src.generate writes and what every evaluation scores."""
    from src.api import HiAR

    pipe = HiAR.from_checkpoint(checkpoint, device="cpu", overrides=["model_config=null", "sampler.steps=[1000,500]"])
    make = pipe.codec.streaming_decoder

    def loud():  # the toy codec's decoder, overshooting 3x
        decoder = make()
        inner = decoder.decode_next
        decoder.decode_next = lambda latents: inner(latents) * 3
        return decoder

    pipe.codec.streaming_decoder = loud
    video = pipe.generate(["a red circle moving left on a black background"], num_frames=6)
    assert video.min() == -1 and video.max() == 1  # reached and held
    assert all(block.pixels.abs().max() <= 1 for block in pipe.stream("a blue square", num_frames=6))
