"""Export a teacher checkpoint's EMA weights: python experiments/teacher_toy/export.py CKPT [OUT]."""

import argparse

from src.training.teacher import export_teacher

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint", help="a Lightning checkpoint written with EMAWeightAveraging (e.g. last.ckpt)")
    parser.add_argument("out", nargs="?", default="assets/toy_teacher.safetensors")
    args = parser.parse_args()
    print(export_teacher(args.checkpoint, args.out))
