"""Tiny Wan2.1 release folders: the real file formats and architectures, random weights, small sizes.

    python -m src.worlds.wan.tiny OUT_DIR

writes three folders a loader cannot tell from a real release except by the tensor sizes:

    OUT_DIR/Wan2.1-T2V-1.3B/             config.json, diffusion_pytorch_model.safetensors (fp32),
                                         models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/ (tokenizer), Wan2.1_VAE.pth
    OUT_DIR/Wan2.1-T2V-14B/              config.json, diffusion_pytorch_model-0000{1..3}-of-00003.safetensors +
                                         diffusion_pytorch_model.safetensors.index.json, the same umT5 / VAE / tokenizer
    OUT_DIR/Wan2.1-T2V-1.3B-Diffusers/   model_index.json, transformer/, text_encoder/, tokenizer/, vae/, scheduler/
                                         (the 1.3B folder's weights under diffusers / transformers names)

plus `OUT_DIR/prompts.txt` (a few prompts) and `OUT_DIR/overrides.txt`: the Hydra overrides that point
`world=wan2.1_1.3b` at these folders with their sizes, e.g.

    python -m src.train experiment=ode_pairs $(cat OUT_DIR/overrides.txt) world.training.num_ode_pairs=4 ...

A cluster install can run every stage on them in minutes (docs/wan_world.md); the tests do (tests/test_wan_chain.py).

The original-format umT5 and VAE files are written by inverting the transformers / diffusers names here, independently
of src/worlds/wan/convert.py (the tests check one against the other, and the VAE against diffusers' own converter).
The tokenizer is a small umT5-style Unigram model (Metaspace pre-tokenizer, pad 0 / EOS 1 / UNK 2, EOS appended)
over English words plus single characters, so any prompt, the Chinese negative prompt included, tokenises.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from src.models.wan import WanConfig, WanDiT
from src.worlds.wan.text import WAN_NEGATIVE_PROMPT

BASE_NAME = "Wan2.1-T2V-1.3B"
TEACHER_NAME = "Wan2.1-T2V-14B"
DIFFUSERS_NAME = "Wan2.1-T2V-1.3B-Diffusers"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
VAE_FILE = "Wan2.1_VAE.pth"
TOKENIZER_DIR = "google/umt5-xxl"
DIT_WEIGHTS = "diffusion_pytorch_model"

WORDS = (
    "a an the cat dog bird fish horse red blue green yellow white black ball car boat tree house runs jumps flies "
    "swims walks over under through slowly fast big small on in at grass sky water street city forest beach snow "
    "night day sunset camera pans close up of with and is moving"
).split()
PROMPTS = [
    "a red ball runs over the grass",
    "a small dog jumps in the snow",
    "a blue car moving on a city street at night",
    "a bird flies over the water at sunset",
    "close up of a white cat on the beach",
    "a big boat moving slowly through the water",
    "a horse walks in the forest with the camera panning",
    "a green tree and a yellow house in the day",
]


@dataclass
class TinySizes:
    """The sizes of the tiny folders (every other architecture constant is Wan2.1's)."""

    text_dim: int = 32  # umT5 width = the DiT's text_dim (4096 in the release)
    base: dict = field(default_factory=lambda: dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2))
    teacher: dict = field(default_factory=lambda: dict(dim=48, ffn_dim=96, num_heads=3, num_layers=3))
    umt5: dict = field(default_factory=lambda: dict(d_kv=8, d_ff=48, num_layers=2, num_heads=4))
    vae: dict = field(default_factory=lambda: dict(base_dim=8, num_res_blocks=2))
    teacher_shards: int = 3
    # one latent frame (16 channels) and the matching pixels (8x)
    latent_height: int = 4
    latent_width: int = 6

    def dit_config(self, which: str) -> WanConfig:
        return WanConfig(**(self.base if which == "base" else self.teacher), text_dim=self.text_dim)

    def vae_config(self) -> dict:
        """The original-format VAE's architecture (WanVAE's `original_config`): Wan2.1's, narrower."""
        return dict(self.vae, z_dim=16, dim_mult=[1, 2, 4, 4], attn_scales=[], temperal_downsample=[False, True, True])


# --------------------------------------------------------------------------------------------- names


def transformers_to_wan_t5(state: dict) -> dict:
    """transformers UMT5EncoderModel names -> Wan T5Encoder names (the tied `encoder.embed_tokens` dropped)."""
    table = {
        r"layer\.0\.SelfAttention\.([qkvo])\.weight": r"attn.\1.weight",
        r"layer\.0\.SelfAttention\.relative_attention_bias\.weight": "pos_embedding.embedding.weight",
        r"layer\.0\.layer_norm\.weight": "norm1.weight",
        r"layer\.1\.layer_norm\.weight": "norm2.weight",
        r"layer\.1\.DenseReluDense\.wi_0\.weight": "ffn.gate.0.weight",
        r"layer\.1\.DenseReluDense\.wi_1\.weight": "ffn.fc1.weight",
        r"layer\.1\.DenseReluDense\.wo\.weight": "ffn.fc2.weight",
    }
    out = {}
    for key, value in state.items():
        if key == "encoder.embed_tokens.weight":
            continue
        if key == "shared.weight":
            out["token_embedding.weight"] = value
        elif key == "encoder.final_layer_norm.weight":
            out["norm.weight"] = value
        else:
            i, rest = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", key).groups()
            (new,) = [re.sub(pat, rep, rest) for pat, rep in table.items() if re.fullmatch(pat, rest)]
            out[f"blocks.{i}.{new}"] = value
    return out


def diffusers_to_wan_vae(state: dict, num_res_blocks: int = 2) -> dict:
    """diffusers AutoencoderKLWan names -> original Wan VAE names."""
    inner = {"norm1.gamma": "residual.0.gamma", "norm2.gamma": "residual.3.gamma"}

    def block(rest: str) -> str:
        if rest in inner:
            return inner[rest]
        head, tail = rest.split(".", 1)
        return {"conv1": "residual.2", "conv2": "residual.6", "conv_shortcut": "shortcut"}.get(head, head) + "." + tail

    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] in ("quant_conv", "post_quant_conv"):
            new = ("conv1." if parts[0] == "quant_conv" else "conv2.") + parts[1]
        elif parts[1] == "conv_in":
            new = f"{parts[0]}.conv1.{parts[2]}"
        elif parts[1] == "norm_out":
            new = f"{parts[0]}.head.0.gamma"
        elif parts[1] == "conv_out":
            new = f"{parts[0]}.head.2.{parts[2]}"
        elif parts[1] == "mid_block":
            idx = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{parts[2]}.{parts[3]}"]
            new = f"{parts[0]}.middle.{idx}.{block('.'.join(parts[4:]))}"
        elif parts[1] == "down_blocks":
            new = f"encoder.downsamples.{parts[2]}.{block('.'.join(parts[3:]))}"
        else:  # decoder.up_blocks.<level>.(resnets.<j>|upsamplers.0).<rest>
            level, kind, j, rest = int(parts[2]), parts[3], int(parts[4]), ".".join(parts[5:])
            flat = level * (num_res_blocks + 2) + (j if kind == "resnets" else num_res_blocks + 1)
            new = f"decoder.upsamples.{flat}.{block(rest) if kind == 'resnets' else rest}"
        out[new] = value
    return out


# --------------------------------------------------------------------------------------------- models


def tiny_tokenizer(words=WORDS, extra_text: str = WAN_NEGATIVE_PROMPT):
    """A umT5-style Unigram tokenizer (transformers fast tokenizer): `▁word` pieces, then single characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()-&/") | set(extra_text))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [(f"▁{w}", -1.0) for w in dict.fromkeys(words)] + [(c, -5.0) for c in chars if c != "▁"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_umt5(vocab_size: int, d_model: int, d_kv: int = 8, d_ff: int = 48, num_layers: int = 2, num_heads: int = 4,
              seed: int = 0):
    """A random transformers UMT5EncoderModel with Wan's umT5 structure (gated GELU, per-layer position bias)."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers,
                        num_heads=num_heads, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                        feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6)
    model = UMT5EncoderModel(config).eval()
    with torch.no_grad():  # non-trivial norms
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def tiny_vae(config: dict, seed: int = 0):
    """A random diffusers AutoencoderKLWan of the given architecture (non-trivial RMS-norm gains)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    model = AutoencoderKLWan(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return model


def tiny_dit(config: WanConfig, seed: int) -> WanDiT:
    torch.manual_seed(seed)
    return WanDiT(config)


# --------------------------------------------------------------------------------------------- files


def release_config(cfg: WanConfig) -> dict:
    """A Wan release `config.json` (the original `WanModel` constructor arguments)."""
    return {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "t2v", "dim": cfg.dim,
            "eps": cfg.eps, "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim, "in_dim": cfg.in_dim,
            "num_heads": cfg.num_heads, "num_layers": cfg.num_layers, "out_dim": cfg.out_dim, "text_len": cfg.text_len,
            "text_dim": cfg.text_dim}


def _state(model: torch.nn.Module) -> dict:
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def write_dit(folder: Path, model: WanDiT, shards: int = 1) -> None:
    """config.json + diffusion_pytorch_model.safetensors, or `shards` files and their index (the 14B layout)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(release_config(model.cfg), indent=2))
    state = _state(model)
    if shards == 1:
        save_file(state, str(folder / f"{DIT_WEIGHTS}.safetensors"))
        return
    keys = list(state)
    per = -(-len(keys) // shards)
    weight_map = {}
    for s in range(shards):
        name = f"{DIT_WEIGHTS}-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[s * per : (s + 1) * per]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{DIT_WEIGHTS}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_text_files(folder: Path, umt5, tokenizer, dtype: torch.dtype = torch.bfloat16) -> None:
    """Wan's `models_t5_umt5-xxl-enc-bf16.pth` (a plain state dict, original names) and `google/umt5-xxl/`."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(dtype) for k, v in transformers_to_wan_t5(_state(umt5)).items()}
    torch.save(state, folder / T5_FILE)
    tokenizer.save_pretrained(folder / TOKENIZER_DIR)


def write_vae_file(path: Path, vae) -> None:
    """`Wan2.1_VAE.pth`: the plain fp32 state dict under the original names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(diffusers_to_wan_vae(_state(vae), vae.config.num_res_blocks), path)


def write_diffusers(folder: Path, dit: WanDiT, umt5, tokenizer, vae) -> None:
    """A `-Diffusers` release: transformer/ (WanTransformer3DModel), text_encoder/, tokenizer/, vae/, scheduler/."""
    from diffusers import UniPCMultistepScheduler, WanTransformer3DModel

    from src.checkpoints import wan_to_diffusers

    cfg = dit.cfg
    transformer = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, eps=cfg.eps,
    )
    transformer.load_state_dict(wan_to_diffusers(_state(dit)), strict=True)  # every name maps, none is missing
    transformer.save_pretrained(folder / "transformer")
    copy.deepcopy(umt5).to(torch.bfloat16).save_pretrained(folder / "text_encoder")  # bf16, as the .pth
    tokenizer.save_pretrained(folder / "tokenizer")
    vae.save_pretrained(folder / "vae")
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0).save_pretrained(
        folder / "scheduler")
    index = {"_class_name": "WanPipeline", "scheduler": ["diffusers", "UniPCMultistepScheduler"],
             "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def _flow(node: dict | list) -> str:
    """A Hydra command-line value for a dict / list (no spaces)."""
    if isinstance(node, dict):
        return "{" + ",".join(f"{k}:{_flow(v)}" for k, v in node.items()) + "}"
    if isinstance(node, list):
        return "[" + ",".join(_flow(v) for v in node) + "]"
    return str(node).lower() if isinstance(node, bool) else str(node)


def tiny_overrides(out_dir: str | Path, sizes: TinySizes | None = None, layout: str = "original") -> list[str]:
    """Hydra overrides that run `world=wan2.1_1.3b` on the folders of `write_tiny_release(out_dir)`.

    layout "original": the 1.3B and 14B release folders; "diffusers": the umT5, VAE and base DiT from the -Diffusers
    folder (the teacher stays the sharded 14B-style folder)."""
    if layout not in ("original", "diffusers"):
        raise ValueError(f"layout must be 'original' or 'diffusers', got {layout!r}")
    sizes = sizes or TinySizes()
    out = Path(out_dir).resolve()
    base = out / BASE_NAME
    args = ["world=wan2.1_1.3b", f"world.paths.wan_root={base}", f"world.paths.teacher_root={out / TEACHER_NAME}",
            f"world.training.prompts={out / 'prompts.txt'}"]
    if layout == "diffusers":
        diffusers = out / DIFFUSERS_NAME
        args += [f"world.text_encoder.weights={diffusers / 'text_encoder'}",
                 f"world.text_encoder.tokenizer={diffusers / 'tokenizer'}",
                 f"world.codec.weights={diffusers / 'vae'}", f"world.critic_init={diffusers}"]
    else:
        args.append(f"world.codec.original_config={_flow(sizes.vae_config())}")
    args += [f"world.latent.height={sizes.latent_height}", f"world.latent.width={sizes.latent_width}",
             f"world.video.height={8 * sizes.latent_height}", f"world.video.width={8 * sizes.latent_width}",
             f"world.text_encoder.text_dim={sizes.text_dim}"]
    for model, dims in (("student", sizes.base), ("critic", sizes.base), ("teacher", sizes.teacher)):
        args += [f"world.{model}.{k}={v}" for k, v in {**dims, "text_dim": sizes.text_dim}.items()]
    return args


def write_tiny_release(out_dir: str | Path, sizes: TinySizes | None = None, seed: int = 0) -> dict[str, Path]:
    """Write the three tiny folders, prompts.txt and overrides.txt under out_dir; returns their paths."""
    sizes = sizes or TinySizes()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    umt5 = tiny_umt5(len(tokenizer), sizes.text_dim, **sizes.umt5, seed=seed)
    vae = tiny_vae(sizes.vae_config(), seed=seed)
    base = tiny_dit(sizes.dit_config("base"), seed=seed + 1)
    teacher = tiny_dit(sizes.dit_config("teacher"), seed=seed + 2)

    paths = {"base": out / BASE_NAME, "teacher": out / TEACHER_NAME, "diffusers": out / DIFFUSERS_NAME}
    write_dit(paths["base"], base)
    write_dit(paths["teacher"], teacher, shards=sizes.teacher_shards)
    for folder in (paths["base"], paths["teacher"]):  # the 14B release ships the same umT5, tokenizer and VAE
        write_text_files(folder, umt5, tokenizer)
        write_vae_file(folder / VAE_FILE, vae)
    if paths["diffusers"].exists():
        shutil.rmtree(paths["diffusers"])
    write_diffusers(paths["diffusers"], base, umt5, tokenizer, vae)
    paths["prompts"] = out / "prompts.txt"
    paths["prompts"].write_text("\n".join(PROMPTS) + "\n")
    paths["overrides"] = out / "overrides.txt"
    paths["overrides"].write_text("\n".join(tiny_overrides(out, sizes)) + "\n")
    return paths


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder to write the tiny releases into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = write_tiny_release(args.out_dir, seed=args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")
    print("run a stage on them with: python -m src.train experiment=<stage> $(cat " f"{paths['overrides']})")
    return paths


if __name__ == "__main__":
    main()
