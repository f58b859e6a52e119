"""Core types that flow through vla_runtime: observations in, action chunks out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass
class Observation:
    """What a policy sees at one instant.

    `privileged_state` is simulator-only ground truth (object and goal poses). The evaluation runner
    fills it only for policies that declare `privileged = True` (the scripted experts); a learned
    policy always gets None, so it cannot lean on state a real robot would not have.
    """

    images: dict[str, np.ndarray]  # camera name -> uint8 [H, W, 3]
    state: np.ndarray  # float32 [S]: end-effector xyz + gripper opening
    instruction: str
    timestamp: float  # seconds, monotonic (simulated time in the simulator)
    privileged_state: np.ndarray | None = None

    def without_privileged_state(self) -> Observation:
        return Observation(self.images, self.state, self.instruction, self.timestamp, None)


@dataclass
class ActionChunk:
    """H future actions, the first meant for time `t0`, then one every `dt` seconds."""

    actions: np.ndarray  # float32 [H, A]
    t0: float
    dt: float
    info: dict[str, Any] = field(default_factory=dict)  # latency, FLOPs, accel stats

    def __post_init__(self) -> None:
        self.actions = np.asarray(self.actions, dtype=np.float32)
        if self.actions.ndim != 2:
            raise ValueError(f"ActionChunk.actions must be [H, A], got shape {self.actions.shape}")

    @property
    def horizon(self) -> int:
        return self.actions.shape[0]


@dataclass
class PolicyStructure:
    """The hook points a policy exposes to acceleration modules.

    A policy fills in what it has and leaves the rest None; an accel module that needs a point the
    policy lacks fails with an error naming both (see `require`).
    """

    vision_encoder: Any = None  # nn.Module mapping images to visual tokens
    preprocess_images: Callable[[Any], Any] | None = None  # Observation -> the vision encoder's input
    lm_layers: Sequence[Any] | None = None  # decoder layers of the language model, in order
    visual_token_span: Callable[[], tuple[int, int]] | None = None  # [start, end) in the LM input
    action_head_blocks: Sequence[Any] | None = None  # e.g. DiT blocks
    denoising_loop: Any = None  # object running the diffusion / flow-matching steps
    ar_decode_loop: Any = None  # object running autoregressive action-token decoding

    def available(self) -> list[str]:
        return [name for name, value in vars(self).items() if value is not None]

    def require(self, point: str, who: str) -> Any:
        value = getattr(self, point, None)
        if value is None:
            raise ValueError(
                f"{who} needs the hook point '{point}', which this policy does not declare "
                f"(it declares: {self.available() or 'none'})"
            )
        return value


@runtime_checkable
class Policy(Protocol):
    """Anything that maps an observation to a chunk of actions.

    `camera_names`: cameras whose images the policy reads (empty: none, so rendering can be skipped).
    `privileged`: True only for scripted experts that read simulator state.
    """

    structure: PolicyStructure
    camera_names: tuple[str, ...]
    privileged: bool

    def reset(self) -> None: ...

    def predict_chunk(self, obs: Observation) -> ActionChunk: ...
