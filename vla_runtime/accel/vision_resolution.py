"""Vision-encoder input resolution: the camera images are resized to `size` pixels instead of the policy's
native input size before the vision encoder.

A ViT's cost grows with its patches (attention quadratically), and a policy that upsamples small camera
images to a large native input (SmolVLA: 128 px frames padded and resized to 512) spends most of it on
interpolated pixels. Fewer patches also mean fewer visual tokens after the connector (SmolVLA's pixel
shuffle: 64 per camera at 512 px, 16 at 256). The weights were trained at the native size, so outputs
change: measured like every method (action deviation, success). The policy declares the setter
(`PolicyStructure.vision_resolution`), which knows which sizes its encoder and connector accept.
"""

from __future__ import annotations

from dataclasses import dataclass

from vla_runtime.accel.method import AccelMethod, Phase, register_method
from vla_runtime.hooks import Handle
from vla_runtime.types import Policy


@dataclass
class VisionResolutionConfig:
    size: int = 256  # pixels per side of the vision encoder's input

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"vision_resolution size must be >= 1, got {self.size}")


def apply(policy: Policy, config: VisionResolutionConfig, artifact: dict | None = None) -> Handle:
    set_resolution = policy.structure.require("vision_resolution", "vision_resolution")
    return Handle("vision_resolution", [set_resolution(config.size)], info={"size": config.size},
                  stats=lambda: {"vision_input_px": config.size})


METHOD = register_method(AccelMethod(
    "vision_resolution", VisionResolutionConfig, apply, requires=("vision_resolution",), phase=Phase.INPUTS,
))
