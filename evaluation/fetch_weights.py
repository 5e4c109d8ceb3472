"""Populate the eval weights folder (the layout of evaluation/models.py) on a machine with internet:

    python -m evaluation.fetch_weights --out /data/eval-weights
    export HIAR_EVAL_WEIGHTS=/data/eval-weights          # then `make eval` finds all four weighted measures

Copy the folder to an offline machine as it is: nothing is downloaded at evaluation time. Sources: MUSIQ-SPAQ from
pyiqa's weight repository (chaofengc/IQA-PyTorch-Weights), CLIP ViT-B/16 and DINOv2-small from their Hugging Face
repositories (weights, configs, tokenizer), AlexNet from torchvision's URL (LPIPS' backbone).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from evaluation.models import CLIP_DIR, DINOV2_DIR, LPIPS_BACKBONE_FILE, MUSIQ_FILE

HF_FOLDERS = {
    CLIP_DIR: ("openai/clip-vit-base-patch16", ["config.json", "model.safetensors", "preprocessor_config.json",
                                                "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                                                "special_tokens_map.json"]),
    DINOV2_DIR: ("facebook/dinov2-small", ["config.json", "model.safetensors", "preprocessor_config.json"]),
}
MUSIQ_SOURCE = ("chaofengc/IQA-PyTorch-Weights", Path(MUSIQ_FILE).name)
ALEXNET_URL = "https://download.pytorch.org/models/" + Path(LPIPS_BACKBONE_FILE).name


def fetch(out: Path) -> list[Path]:
    os.environ["HF_HUB_OFFLINE"] = "0"  # evaluation.models forbids the network for evaluation, not for this
    import torch
    from huggingface_hub import hf_hub_download, snapshot_download

    written = []
    for folder, (repo, files) in HF_FOLDERS.items():
        snapshot_download(repo, local_dir=out / folder, allow_patterns=files)
        written.append(out / folder)
    musiq = out / MUSIQ_FILE
    hf_hub_download(MUSIQ_SOURCE[0], MUSIQ_SOURCE[1], local_dir=musiq.parent)
    written.append(musiq)
    alexnet = out / LPIPS_BACKBONE_FILE
    alexnet.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(ALEXNET_URL, str(alexnet))
    written.append(alexnet)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the weights folder (HIAR_EVAL_WEIGHTS / weights_dir)")
    args = parser.parse_args(argv)
    for path in fetch(Path(args.out)):
        print(path)


if __name__ == "__main__":
    main()
