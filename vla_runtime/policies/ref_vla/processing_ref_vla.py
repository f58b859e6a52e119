"""Inputs and outputs of the reference VLAs: instruction tokenizer, image and state/action scaling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

PAD, UNK = "[PAD]", "[UNK]"


def train_instruction_tokenizer(instructions: list[str]) -> Tokenizer:
    """A word-level tokenizer (HF `tokenizers`) over the task instructions; unknown words -> [UNK]."""
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(instructions, trainers.WordLevelTrainer(special_tokens=[PAD, UNK]))
    return tokenizer


def tokenize(tokenizer: Tokenizer, instructions: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids [B, max_tokens], mask [B, max_tokens]); padded on the right, cut at max_tokens."""
    pad_id = tokenizer.token_to_id(PAD)
    ids = torch.full((len(instructions), max_tokens), pad_id, dtype=torch.long)
    mask = torch.zeros((len(instructions), max_tokens), dtype=torch.long)
    for row, text in enumerate(instructions):
        tokens = tokenizer.encode(text).ids[:max_tokens]
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = 1
    return ids, mask


class Normalizer:
    """State: standardised with dataset mean/std. Actions: min/max of the dataset -> [-1, 1]."""

    def __init__(self, stats: dict):
        self.stats = stats
        self.state_mean = torch.tensor(stats["state"]["mean"], dtype=torch.float32, device="cpu")
        self.state_std = torch.tensor(stats["state"]["std"], dtype=torch.float32, device="cpu").clamp_min(1e-6)
        self.action_low = torch.tensor(stats["action"]["min"], dtype=torch.float32, device="cpu")
        self.action_high = torch.tensor(stats["action"]["max"], dtype=torch.float32, device="cpu")
        self._action_range = (self.action_high - self.action_low).clamp_min(1e-6)

    def state(self, state: torch.Tensor) -> torch.Tensor:
        return (state - self.state_mean) / self.state_std

    def action(self, action: torch.Tensor) -> torch.Tensor:
        return 2 * (action - self.action_low) / self._action_range - 1

    def unnormalize_action(self, action: torch.Tensor) -> torch.Tensor:
        return (action.clamp(-1, 1) + 1) / 2 * self._action_range + self.action_low

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.stats, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Normalizer:
        try:
            return cls(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"{path} is not a valid normalisation stats file: {exc}") from exc


def images_to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float [-1, 1]."""
    images = torch.as_tensor(images)
    return images.float().div(127.5).sub(1.0)


def color_jitter(images: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image's brightness, contrast and saturation scaled by factors drawn from [1 - strength, 1 + strength]
    (uint8 [B, 3, H, W] in and out; 0: unchanged), as torchvision's ColorJitter does: a policy cloned from pixels
    should not hinge on one lighting's exact colours."""
    if strength <= 0:
        return images

    def factor() -> torch.Tensor:
        return 1 + strength * (2 * torch.rand(images.shape[0], 1, 1, 1, generator=generator) - 1)

    def gray(x: torch.Tensor) -> torch.Tensor:
        return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).clamp(0, 255)

    x = (images.float() * factor()).clamp(0, 255)  # brightness
    mean = gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * factor() + mean).clamp(0, 255)  # contrast
    luminance = gray(x)
    x = (x - luminance) * factor() + luminance  # saturation
    return x.clamp(0, 255).round().to(torch.uint8)


def random_shift(images: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by up to `pad` pixels (edge padding + random crop): the augmentation that
    keeps behaviour cloning from memorising pixel positions."""
    batch, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad), mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    rows = (dy[:, None] + torch.arange(height)[None])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(width)[None])[:, None, None, :]
    channels = torch.arange(images.shape[1])[None, :, None, None]
    return padded[torch.arange(batch)[:, None, None, None], channels, rows, cols]
