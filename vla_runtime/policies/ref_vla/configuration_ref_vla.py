"""Configuration of the reference VLAs: a ViT (behind a conv stem) + a Llama decoder + an action head.

`head="dit"`: CogACT-like; the LM's cognition token conditions a DiT that denoises an action chunk
(flow matching). `head="ar"`: OpenVLA-like; the LM emits action_dim x chunk_size action tokens, 256
bins per dimension, greedily.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from vla_runtime.types import image_crop


@dataclass
class RefVLAConfig:
    head: str = "dit"  # "dit" | "ar"
    # Each camera's image becomes num_visual_tokens tokens (one shared encoder), in this order.
    cameras: tuple[str, ...] = ("corner4",)
    image_size: int = 128
    # The part of each camera's full frame it reads, [left, top, right, bottom] fractions (None: the whole frame):
    # the crop its training data was rendered with, declared so every runner renders or crops the same.
    image_crop: tuple[float, float, float, float] | None = None
    state_dim: int = 4
    action_dim: int = 4
    chunk_size: int = 8
    actions_per_chunk: int = 4  # executed before asking again (receding horizon)
    control_dt: float = 0.0125  # seconds between actions of the data it was trained on (Meta-World: 80 Hz)
    # Conv stem: each stage halves the image; the ViT then cuts the feature map into patches.
    stem_channels: tuple[int, ...] = (32, 64, 128)
    vit_patch_size: int = 2
    vit_hidden: int = 128
    vit_layers: int = 4
    vit_heads: int = 4
    # Language model (transformers Llama, trained from scratch).
    lm_hidden: int = 256
    lm_layers: int = 8
    lm_heads: int = 4
    lm_kv_heads: int = 4
    lm_intermediate: int = 512
    max_text_tokens: int = 16
    text_vocab_size: int = 0  # set from the tokenizer
    # DiT action head.
    dit_hidden: int = 192
    dit_layers: int = 4
    dit_heads: int = 4
    dit_mlp_ratio: float = 4.0
    denoising_steps: int = 10
    # Training-time real-time chunking (arXiv 2512.05964): the head trained with the chunk's first d actions given
    # clean (d uniform in 0..rtc_max_delay, no loss on them), so at inference the actions that run while the chunk
    # is computed are fed in and the rest continues them. 0: not trained for it.
    rtc_max_delay: int = 0
    # AR action tokens.
    action_bins: int = 256

    def __post_init__(self) -> None:
        self.stem_channels = tuple(self.stem_channels)
        self.cameras = (self.cameras,) if isinstance(self.cameras, str) else tuple(self.cameras)
        self.image_crop = image_crop(self.image_crop)
        if not self.cameras:
            raise ValueError("RefVLAConfig.cameras names no camera")
        if self.head not in ("dit", "ar"):
            raise ValueError(f"Unknown action head '{self.head}': use 'dit' or 'ar'")
        if self.feature_map_size % self.vit_patch_size:
            raise ValueError(f"Feature map {self.feature_map_size} not divisible by patch {self.vit_patch_size}")
        if not 0 <= self.rtc_max_delay < self.chunk_size:
            raise ValueError(f"rtc_max_delay must be in [0, chunk_size={self.chunk_size}), got {self.rtc_max_delay}")
        if self.rtc_max_delay and self.head != "dit":
            raise ValueError("rtc_max_delay (training-time real-time chunking) needs head=dit")
        if self.num_visual_tokens < 64:
            raise ValueError(f"{self.num_visual_tokens} visual tokens per image; the reference VLAs use >= 64")

    @property
    def feature_map_size(self) -> int:
        return self.image_size // 2 ** len(self.stem_channels)

    @property
    def num_visual_tokens(self) -> int:
        """Per camera image."""
        return (self.feature_map_size // self.vit_patch_size) ** 2

    @property
    def num_action_tokens(self) -> int:
        return self.action_dim * self.chunk_size

    def to_json(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: Path) -> RefVLAConfig:
        try:
            options = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        if "camera" in options:  # checkpoints saved before multi-camera models: one camera
            options["cameras"] = [options.pop("camera")]
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"{path}: unknown config keys {unknown}")
        return cls(**options)


# SmolVLA-scale, for speed benchmarks only: never trained, random weights.
LARGE_RANDOM_WEIGHTS = dict(
    stem_channels=(64, 128, 256), vit_hidden=768, vit_layers=12, vit_heads=12,
    lm_hidden=960, lm_layers=16, lm_heads=15, lm_kv_heads=5, lm_intermediate=2560,
    dit_hidden=1024, dit_layers=12, dit_heads=16,
)
