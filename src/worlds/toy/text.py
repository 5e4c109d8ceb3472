"""A frozen, seeded toy text encoder: no downloads, deterministic, sensitive to word order.

Each word gets a fixed random vector: words of the toy world's vocabulary from one seeded table, any other word from a
generator seeded by a stable hash of the word, so unknown words are deterministic too. A fixed sinusoidal position
code is added, so "a red circle on a blue background" and "a blue circle on a red background" differ.
Padding rows are zero and masked out.
"""

from __future__ import annotations

import math
import re
import zlib

import torch

from src.worlds.base import TextEncoder
from src.worlds.toy.shapes import WORDS

POSITION_SCALE = 0.5  # position code norm relative to the unit-norm word vectors


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """[length, dim]: sin/cos pairs at geometric frequencies (Transformer position code), unit norm per row."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    freqs = torch.pow(10000.0, -torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    code = torch.zeros(length, dim, dtype=torch.float64)
    code[:, 0::2] = torch.sin(pos * freqs)
    code[:, 1::2] = torch.cos(pos * freqs[: dim // 2])
    return (code / math.sqrt(dim / 2)).float()


def tokenize(prompt: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", prompt.lower())


class ToyTextEncoder(TextEncoder):
    def __init__(self, text_len: int = 16, text_dim: int = 64, seed: int = 0):
        super().__init__()
        if text_len < 1 or text_dim < 2 or text_dim % 2:
            raise ValueError(f"need text_len >= 1 and an even text_dim >= 2, got {text_len}, {text_dim}")
        self.text_len, self.text_dim, self.seed = text_len, text_dim, seed
        self.vocabulary = {word: i for i, word in enumerate(WORDS)}
        table = torch.randn(len(WORDS), text_dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("word_vectors", table / table.norm(dim=1, keepdim=True), persistent=False)
        self.register_buffer("positions", POSITION_SCALE * sinusoidal_positions(text_len, text_dim), persistent=False)
        self.requires_grad_(False)

    def word_vector(self, word: str) -> torch.Tensor:
        if word in self.vocabulary:
            return self.word_vectors[self.vocabulary[word]]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(word.encode()))
        vector = torch.randn(self.text_dim, generator=generator).to(self.word_vectors.device)
        return vector / vector.norm()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            raise ValueError("encode takes a list of prompts, not a single string")
        device = self.word_vectors.device
        embeddings = torch.zeros(len(prompts), self.text_len, self.text_dim, device=device)
        mask = torch.zeros(len(prompts), self.text_len, dtype=torch.bool, device=device)
        for i, prompt in enumerate(prompts):
            words = tokenize(prompt)[: self.text_len]  # longer prompts are truncated, as umT5 does
            for j, word in enumerate(words):
                embeddings[i, j] = self.word_vector(word) + self.positions[j]
            mask[i, : len(words)] = True
        return embeddings, mask
