"""The Wan2.1 text encoder: the umT5-XXL encoder through transformers `UMT5EncoderModel` (wan21.md §6).

Weights come from Wan's own `models_t5_umt5-xxl-enc-bf16.pth` (names converted, architecture read off the tensor
shapes) or from a transformers folder (`text_encoder/` of a diffusers release); the tokenizer is the `google/umt5-xxl`
folder of the Wan release (or `tokenizer/`). Prompts are cleaned like Wan's (html unescape, whitespace collapse, ftfy
when installed), tokenised to exactly `text_len` (512) tokens with EOS, encoded, and every padding row is zeroed.

The umT5 model (5.7 B parameters) is deliberately not a registered submodule: it stays out of state dicts and
checkpoints, and `.to(device)` on the world does not move it. It runs on the device of this module (followed through a
size-0 buffer) and, with `offload=True`, goes back to the CPU after every call. The negative prompt's embedding is
computed once, on first use, and reused whenever that prompt is asked for again.
"""

from __future__ import annotations

import html
import importlib.util
import re
from pathlib import Path

import torch

from src.worlds.base import TextEncoder
from src.worlds.wan.convert import (
    load_exact,
    load_original,
    t5_original_to_transformers,
    torch_dtype,
    umt5_config_from_original,
)
from src.worlds.wan.paths import check_files, tokenizer_files, weights_files

# Wan2.1 `wan/configs/shared_config.py`: `sample_neg_prompt`, the unconditional text of CFG in Wan, Self-Forcing, HiAR.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

_HAS_FTFY = importlib.util.find_spec("ftfy") is not None


def clean_prompt(text: str) -> str:
    """Wan's `clean='whitespace'`: ftfy.fix_text (if installed), html unescape twice, collapse whitespace."""
    if _HAS_FTFY:
        import ftfy

        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def load_umt5(weights: str | Path, dtype: torch.dtype):
    """A frozen `UMT5EncoderModel` from Wan's `.pth` or from a transformers folder, on the CPU."""
    from transformers import UMT5EncoderModel

    path = Path(weights)
    if path.is_dir():
        model = UMT5EncoderModel.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    else:
        state = load_original(path)
        with torch.device("meta"):
            model = UMT5EncoderModel(umt5_config_from_original(state))
        load_exact(model, t5_original_to_transformers(state, str(path)), str(path))
        model.set_input_embeddings(model.shared)  # one embedding matrix, as in the tied original
        model.to(dtype)
    return model.eval().requires_grad_(False)


class WanTextEncoder(TextEncoder):
    def __init__(
        self,
        weights: str | Path,
        tokenizer: str | Path,
        text_len: int = 512,
        text_dim: int = 4096,
        dtype: str = "bfloat16",
        offload: bool = True,
        negative_prompt: str = WAN_NEGATIVE_PROMPT,
    ):
        super().__init__()
        from transformers import AutoTokenizer

        check_files({**weights_files("text encoder", weights, "model"), **tokenizer_files(tokenizer)})
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
        umt5 = load_umt5(weights, torch_dtype(dtype))
        if umt5.config.d_model != text_dim:
            raise ValueError(f"{weights}: the encoder's width is {umt5.config.d_model}, the config says {text_dim}")
        self.__dict__["umt5"] = umt5  # not a submodule (see the module docstring)
        self.text_len = text_len
        self.text_dim = text_dim
        self.offload = offload
        self.negative_prompt = negative_prompt
        self._negative: tuple[torch.Tensor, torch.Tensor] | None = None
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> (embeddings [B, text_len, text_dim], encoder dtype, padding rows zero; mask [B, text_len])."""
        if isinstance(prompts, str) or not prompts:
            raise TypeError("encode takes a non-empty list of prompts")
        device = self._device_anchor.device
        todo = [p for p in dict.fromkeys(prompts) if p != self.negative_prompt or self._negative is None]
        done = {}
        if todo:
            emb, mask = self._run(todo, device)
            done = {p: (emb[i], mask[i]) for i, p in enumerate(todo)}
            if self.negative_prompt in done:
                self._negative = tuple(t.clone() for t in done[self.negative_prompt])  # not a view of the batch
        rows = [done[p] if p in done else self._negative for p in prompts]
        emb = torch.stack([e.to(device) for e, _ in rows])
        mask = torch.stack([m.to(device) for _, m in rows])
        return emb, mask

    def _run(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_tensors="pt",
        )
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device).bool()
        self.umt5.to(device)
        try:
            out = self.umt5(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        finally:
            if self.offload:
                self.umt5.to("cpu")
        return out.masked_fill(~mask[..., None], 0), mask
