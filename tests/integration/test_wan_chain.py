"""The Wan world end to end on a generated tiny release (src.worlds.wan.tiny): ode_pairs -> ode_init -> hiar_fkl ->
src.generate (mp4 through AutoencoderKLWan's streaming decode) -> evaluation.run, each composed from
`world=wan2.1_1.3b`, the folder paths and size overrides only (the overrides.txt the generator writes), plus stage
sizes. Also: the folders' formats load and agree, and `which` picks the weights of an official-format .pt init."""

from __future__ import annotations

import io
import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import webdataset as wds
from hydra import compose, initialize_config_dir

from src.checkpoints import export_training_checkpoint, load_dit, read_state_dict
from src.sampling.noise import derived_seed
from src.sampling.ode import sample_ode
from src.training.distill import DistillTask
from src.worlds.wan import WanTextEncoder
from src.worlds.wan.tiny import BASE_NAME, DIFFUSERS_NAME, TEACHER_NAME, TinySizes, tiny_overrides, write_tiny_release

ROOT = Path(__file__).resolve().parents[2]
CONF = str(ROOT / "conf")
NUM_FRAMES = 6  # latent frames: 2 blocks of 3
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
FIT_QUIET = ["~callbacks.progress", "~callbacks.checkpoint"]  # the training stages' default callbacks


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_wan")
    write_tiny_release(out)
    return out


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(name, overrides=overrides)


def _world_args(release: Path) -> list[str]:
    lines = (release / "overrides.txt").read_text().split()
    assert lines == tiny_overrides(release) and lines[0] == "world=wan2.1_1.3b"
    return lines


def _state_equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_folders_are_release_formats_and_agree(release):
    base, teacher, diffusers = release / BASE_NAME, release / TEACHER_NAME, release / DIFFUSERS_NAME
    config = json.loads((base / "config.json").read_text())
    assert config["model_type"] == "t2v" and config["dim"] == TinySizes().base["dim"]
    index = json.loads((teacher / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"diffusion_pytorch_model-0000{i}-of-00003.safetensors"
                                                         for i in (1, 2, 3)]
    assert not (teacher / "diffusion_pytorch_model.safetensors").exists()
    original = load_dit(base).state_dict()
    from_diffusers = load_dit(diffusers).state_dict()  # transformer/ under diffusers names, its own config.json
    assert _state_equal(original, from_diffusers)
    big = load_dit(teacher)
    assert big.cfg.dim == TinySizes().teacher["dim"] and len(big.state_dict()) == 15 + 27 * big.cfg.num_layers
    # the original umT5 .pth (bf16, as its name says) and the transformers folder give the same embeddings
    t5 = torch.load(base / "models_t5_umt5-xxl-enc-bf16.pth", weights_only=True)
    assert all(v.dtype == torch.bfloat16 for v in t5.values())
    kw = dict(text_len=32, text_dim=TinySizes().text_dim, dtype="float32")
    prompts = ["a red ball runs over the grass", "一只猫 & a dog!"]
    emb_pth, mask = WanTextEncoder(base / "models_t5_umt5-xxl-enc-bf16.pth", base / "google/umt5-xxl", **kw).encode(prompts)
    emb_dir, mask_dir = WanTextEncoder(diffusers / "text_encoder", diffusers / "tokenizer", **kw).encode(prompts)
    assert torch.equal(mask, mask_dir) and (emb_pth - emb_dir).abs().max() < 1e-6
    assert mask.sum(1).min() > 1 and (emb_pth[mask].abs().sum(-1) > 0).all()


def test_which_picks_the_init_of_an_official_checkpoint(release, tmp_path):
    """An official-format hiar.pt initialises the generator (its generator, not the EMA); the critic stays the base."""
    from src.training.distill import DistillTask

    torch.manual_seed(5)
    entries = {name: {k: torch.randn_like(v) for k, v in load_dit(release / BASE_NAME).state_dict().items()}
               for name in ("generator", "critic", "generator_ema")}
    export_training_checkpoint(tmp_path / "hiar.pt", **entries)
    cfg = _compose("train", [*_world_args(release), "experiment=hiar_fkl", f"paths.root_dir={tmp_path}",
                             f"paths.output_dir={tmp_path}/run", f"task.generator_init={tmp_path / 'hiar.pt'}",
                             "task.generator_init_which=generator"])
    from hydra.utils import instantiate

    task = instantiate(cfg.task, _recursive_=False)
    assert isinstance(task, DistillTask)
    assert _state_equal(task.generator.state_dict(), entries["generator"])
    assert _state_equal(task.critic.state_dict(), load_dit(release / BASE_NAME).state_dict())
    critic_from_pt, _ = read_state_dict(tmp_path / "hiar.pt", which="critic")
    assert _state_equal(critic_from_pt, entries["critic"])


def _shard_samples(shard_dir: Path) -> list[dict]:
    samples = []
    for shard in sorted(shard_dir.glob("ode-*.tar")):
        for s in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False):
            meta = json.loads(s["json"])
            samples.append({"index": int(s["__key__"]), "prompt": meta["prompt"],
                            "states": np.load(io.BytesIO(s["npy"]), allow_pickle=False)})
    return samples


def test_chain_on_a_tiny_release(release, tmp_path, monkeypatch):
    from evaluation.run import evaluate
    from src.generate import generate
    from src.train import train
    from src.training.ode_pairs import weights_sha256

    world = _world_args(release)
    stage = [*world, f"paths.root_dir={tmp_path}", "world.training.num_ode_pairs=4", "world.training.batch_size=2",
             f"ode_pairs.num_frames={NUM_FRAMES}", *QUIET]
    artifacts = tmp_path / "artifacts" / "wan2.1_1.3b"

    # 1. ODE pairs from the ODE teacher (the 1.3B base), official settings: 48 Euler steps, shift 8, CFG 6
    train(_compose("train", [*stage, "experiment=ode_pairs", f"paths.output_dir={tmp_path}/run_pairs",
                             "data.pairs_per_shard=2"]))
    shard_dir = artifacts / "ode_pairs"
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    assert manifest["ode_teacher"]["sha256"] == weights_sha256(release / BASE_NAME)
    assert manifest["ode_teacher"]["sha256"] != weights_sha256(release / TEACHER_NAME)
    assert (manifest["num_steps"], manifest["shift"], manifest["guidance"]) == (48, 8.0, 6.0)
    assert manifest["ode_teacher"]["dtype"] == "torch.float32"
    samples = _shard_samples(shard_dir)
    prompts = (release / "prompts.txt").read_text().split("\n")[:4]
    assert [s["prompt"] for s in samples] == prompts and samples[0]["states"].shape == (5, NUM_FRAMES, 16, 4, 6)
    # recompute the first trajectory with the base folder's DiT, independently of the task
    base_cfg = _compose("train", world).world
    encoder = WanTextEncoder(base_cfg.text_encoder.weights, base_cfg.text_encoder.tokenizer, text_len=512,
                             text_dim=TinySizes().text_dim)
    cond, _ = encoder.encode([samples[0]["prompt"]])
    uncond, _ = encoder.encode([base_cfg.negative_prompt])
    g = torch.Generator().manual_seed(derived_seed(0, "ode_pairs", samples[0]["index"]))
    noise = torch.randn((1, NUM_FRAMES, 16, 4, 6), generator=g)
    for folder, same in ((release / BASE_NAME, True), (release / TEACHER_NAME, False)):
        _, states = sample_ode(load_dit(folder).eval(), cond, noise=noise, uncond_context=uncond, num_steps=48,
                               shift=8.0, guidance_scale=6.0, return_states_at=[0, 12, 24, 36, 48])
        expected = torch.stack([states[i][0] for i in (0, 12, 24, 36, 48)]).numpy()
        gap = np.abs(samples[0]["states"] - expected)[1:].max()
        assert (gap < 1e-5) if same else (gap > 1e-3), (folder.name, gap)

    # another setting makes its own shards in its own run folder (src/artifacts.py); unpublished, the published
    # shards stay as they were
    before = {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()}
    train(_compose("train", [*stage, "experiment=ode_pairs", f"paths.output_dir={tmp_path}/run_pairs2",
                             "data.pairs_per_shard=2", "ode_pairs.guidance=5.0", "publish=false"]))
    assert {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()} == before
    assert json.loads((tmp_path / "run_pairs2/export/manifest.json").read_text())["guidance"] == 5.0

    # 2. ODE init, 3. hiar_fkl (2 iterations: a generator + critic update, then a critic update)
    train(_compose("train", [*stage, "experiment=ode_init", f"paths.output_dir={tmp_path}/run_init", *FIT_QUIET,
                             "world.training.ode_init_steps=2", "world.training.lr_ode_init=1e-4"]))
    assert (artifacts / "ode_init" / "ode_init.safetensors").exists()
    seen = {"dmd_and_critic": [], "trajectories": []}  # the prompts of every batch hiar_fkl trains on
    training_step = DistillTask.training_step

    def recording_step(self, batch, batch_idx):
        seen["dmd_and_critic"] += [*batch.get("prompt", []), *batch["critic_prompt"]]
        seen["trajectories"] += batch.get("trajectory_prompt", [])
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(DistillTask, "training_step", recording_step)
    metrics = train(_compose("train", [*stage, "experiment=hiar_fkl", f"paths.output_dir={tmp_path}/run_hiar", *FIT_QUIET,
                                       "world.training.ode_init_steps=2", "world.training.lr_ode_init=1e-4",
                                       "world.training.distill_steps=3", f"task.num_frames={NUM_FRAMES}"]))
    assert {"train/dmd", "train/fkl", "train/critic"} <= set(metrics)
    # DMD and the critic stream over the whole prompt file, beyond the ODE-pair prompts; forward-KL reads the pairs
    prompt_file = [p for p in (release / "prompts.txt").read_text().split("\n") if p]
    assert set(seen["dmd_and_critic"]) <= set(prompt_file) and set(seen["dmd_and_critic"]) - set(prompts)
    assert seen["trajectories"] and set(seen["trajectories"]) <= set(prompts)
    out = artifacts / "hiar_fkl"
    student = load_dit(out / "student.safetensors")
    # the official layout carries no config (as HiAR's own); no EMA yet: it starts at iteration 200
    official = load_dit(out / "model.pt", which="generator", config=student.cfg)
    assert _state_equal(student.state_dict(), official.state_dict())
    init = load_dit(artifacts / "ode_init" / "ode_init.safetensors").state_dict()
    assert not _state_equal(student.state_dict(), init)  # trained

    # 4. generate through the Wan VAE's streaming decode
    videos = tmp_path / "videos" / "hiar_fkl"
    generate(_compose("generate", [*world, f"paths.root_dir={tmp_path}", f"checkpoint={out / 'student.safetensors'}",
                                   f"prompts={release / 'prompts.txt'}", "max_prompts=1", f"num_frames={NUM_FRAMES}",
                                   f"output_dir={videos}", f"paths.output_dir={videos}"]))
    settings = json.loads((videos / "settings.json").read_text())
    (mp4,) = sorted(videos.glob("*.mp4"))
    frames = iio.imread(mp4)
    factor = settings["upscale"]
    assert frames.shape == (4 * (NUM_FRAMES - 1) + 1, 32 * factor, 48 * factor, 3)
    assert settings["pixel_frames"] == frames.shape[0]

    # 5. the evaluation report on those videos
    report_dir = tmp_path / "report"
    evaluate(_compose("eval", [*world, f"paths.root_dir={tmp_path}", f"paths.output_dir={report_dir}",
                               f"out_dir={report_dir}", f"videos_dir={videos.parent}", "weights_dir=null"]))
    report = json.loads((report_dir / "report.json").read_text())
    summary = report["methods"]["hiar_fkl"]["summary"]
    assert summary["videos"] == 1 and set(summary["drift_measures"]) == {"hsv_saturation", "laplacian_variance"}
    assert np.isfinite(summary["drift"])
    assert set(report["unavailable"]) == {"musiq", "clip_iqa", "dinov2_cos", "lpips"}
    text = (report_dir / "report.md").read_text()
    assert "hsv_saturation" in text and "laplacian_variance" in text
