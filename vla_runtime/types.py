"""Core types that flow through vla_runtime: observations in, action chunks out."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # torch stays out of the import of this module: simulators and ROS readers use it
    from torch import nn


@dataclass
class Observation:
    """What a policy sees at one instant.

    `privileged_state` is simulator-only ground truth (object and goal poses). The evaluation runner
    fills it only for policies whose spec says `privileged` (the scripted experts); a learned
    policy always gets None, so it cannot lean on state a real robot would not have.
    """

    images: dict[str, np.ndarray]  # camera name -> uint8 [H, W, 3]
    state: np.ndarray  # float32 [S]: proprioception (RobotSpec.state_dim)
    instruction: str
    timestamp: float  # seconds, monotonic (simulated time in the simulator)
    privileged_state: np.ndarray | None = None
    # Real-time chunking: what the robot will still execute of its current chunk while this request is computed
    # (the control loop fills it with `runtime.chunking=rtc`; a policy without RTC ignores it).
    prefix: ChunkPrefix | None = None

    def without_privileged_state(self) -> Observation:
        return dataclasses.replace(self, privileged_state=None)


@dataclass(frozen=True)
class ChunkPrefix:
    """The current chunk's actions from the request's tick on, [L, A] (the new chunk's first L actions are meant
    for the same ticks), and `delay`: how many of them run before the new chunk can arrive (the inference
    latency in control ticks): the new chunk's first `delay` actions are never executed, the previous chunk's
    are."""

    actions: np.ndarray
    delay: int

    def __post_init__(self) -> None:
        actions = np.asarray(self.actions)
        if actions.ndim != 2 or len(actions) == 0 or not np.all(np.isfinite(actions)):
            raise ValueError(f"ChunkPrefix.actions must be a finite, non-empty [L, A] array, got shape {actions.shape}")
        if self.delay < 0:
            raise ValueError(f"ChunkPrefix.delay must be >= 0 control ticks, got {self.delay}")


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


ImageCrop = tuple[float, float, float, float]  # (left, top, right, bottom), fractions of a camera's full frame


def image_crop(crop: Sequence[float] | None) -> ImageCrop | None:
    """A validated crop (None: the whole frame); anything else is one clear error."""
    if crop is None:
        return None
    values = tuple(float(value) for value in crop)
    if len(values) != 4 or not (0.0 <= values[0] < values[2] <= 1.0 and 0.0 <= values[1] < values[3] <= 1.0):
        raise ValueError(f"image_crop must be [left, top, right, bottom], fractions of the frame with "
                         f"0 <= left < right <= 1 and 0 <= top < bottom <= 1; got {list(crop)}")
    return values  # type: ignore[return-value]


def crop_frame(frame: np.ndarray, crop: ImageCrop | None) -> np.ndarray:
    """The part of a camera frame [H, W, ...] a policy reads (whole pixels, rounded): every path that turns a
    camera frame into a policy's input (simulators, the ROS node) crops through here, so they agree."""
    if crop is None:
        return frame
    height, width = frame.shape[:2]
    left, top, right, bottom = (round(c * n) for c, n in zip(crop, (width, height, width, height), strict=True))
    return frame[top:bottom, left:right]


@dataclass(frozen=True)
class RobotSpec:
    """What a simulator suite (or a robot) gives and takes: the contract a policy must fit."""

    action_dim: int
    state_dim: int
    cameras: tuple[str, ...]  # cameras it renders
    image_size: tuple[int, int]  # (height, width) of every camera image
    control_dt: float  # seconds per action
    image_crop: ImageCrop | None = None  # the part of each camera's full frame its images show (None: all)
    action_low: tuple[float, ...] = ()  # per-dimension limits (empty: none)
    action_high: tuple[float, ...] = ()
    hold_dims: tuple[int, ...] = ()  # kept at their last command when the robot is held (grippers)
    state_names: tuple[str, ...] = ()

    def describe(self) -> str:
        crop = f" (crop {list(self.image_crop)})" if self.image_crop else ""
        return (f"{self.action_dim}-D actions, {self.state_dim}-D state, cameras {list(self.cameras)} at "
                f"{self.image_size[0]}x{self.image_size[1]}{crop}, {1 / self.control_dt:g} Hz")


@dataclass(frozen=True)
class PolicySpec:
    """What a policy declares about itself; callers read this, never a policy's private attributes."""

    action_dim: int
    state_dim: int
    cameras: tuple[str, ...] = ()  # cameras whose images it reads (empty: none, so rendering can be skipped)
    image_size: tuple[int, int] | None = None  # (height, width) it needs from each camera; None: any
    image_crop: ImageCrop | None = None  # the part of each camera's full frame it was trained on (None: all)
    chunk_size: int = 1  # actions per predicted chunk
    control_dt: float | None = None  # seconds between its actions; None: any rate
    actions_per_chunk: int | None = None  # executed before asking again (receding horizon); None: all
    privileged: bool = False  # reads simulator state (scripted experts only)
    # Trained for real-time chunking (training-time RTC): it continues up to this many given actions, the first of
    # an `Observation.prefix` (what runs while it computes), so `runtime.chunking=rtc_trained` applies. 0: not.
    rtc_max_delay: int = 0
    # Requests it computes at once: 1 for a model in this process; a policy server (policy=remote) its slots.
    concurrent_requests: int = 1

    def describe(self) -> str:
        size = f" at {self.image_size[0]}x{self.image_size[1]}" if self.image_size and self.cameras else ""
        size += f" (crop {list(self.image_crop)})" if self.image_crop and size else ""
        rate = f", {1 / self.control_dt:g} Hz" if self.control_dt else ""
        return f"{self.action_dim}-D actions, {self.state_dim}-D state, cameras {list(self.cameras)}{size}{rate}"

    def mismatches(self, robot: RobotSpec) -> list[str]:
        """What keeps this policy from running on `robot` (empty when it fits)."""
        problems = []
        if self.action_dim != robot.action_dim:
            problems.append(f"action dim {self.action_dim} vs {robot.action_dim}")
        if self.state_dim != robot.state_dim:
            problems.append(f"state dim {self.state_dim} vs {robot.state_dim}")
        missing = [camera for camera in self.cameras if camera not in robot.cameras]
        if missing:
            problems.append(f"cameras {missing} are not rendered")
        if self.cameras and self.image_size is not None and tuple(self.image_size) != tuple(robot.image_size):
            problems.append(f"image size {self.image_size} vs {robot.image_size}")
        if self.cameras and self.image_size is not None and self.image_crop != robot.image_crop:
            problems.append(f"image crop {list(self.image_crop or (0, 0, 1, 1))} vs "
                            f"{list(robot.image_crop or (0, 0, 1, 1))}")
        if self.control_dt is not None and abs(self.control_dt - robot.control_dt) > 1e-9:
            problems.append(f"control period {self.control_dt} s vs {robot.control_dt} s")
        return problems

    def check_fits(self, robot: RobotSpec, policy: str, robot_name: str) -> None:
        problems = self.mismatches(robot)
        if problems:
            raise ValueError(f"Policy '{policy}' ({self.describe()}) does not fit {robot_name} "
                             f"({robot.describe()}): {'; '.join(problems)}")


@dataclass
class LanguageModel:
    """A decoder-only language model over the policy's prefix (Llama-style layers: `self_attn` with
    q/k/v/o projections, `input_layernorm`, `post_attention_layernorm`, `mlp`)."""

    layers: nn.ModuleList  # decoder layers, in order; methods may shrink the list in place
    norm: nn.Module  # the final norm
    config: Any  # its config; `num_hidden_layers` (and `layer_types`) follow the layer list
    # The LM as one module, forward(inputs_embeds=, attention_mask= (2-D padding: causal; or 4-D), ...) ->
    # output with `last_hidden_state`, and what methods that replace that forward read. None where the policy
    # drives the layers itself (SmolVLA: the VLM's and the action expert's layers interleave): those methods
    # are refused.
    module: nn.Module | None = None
    rotary_emb: Callable[[Any, Any], tuple[Any, Any]] | None = None  # (hidden, position_ids) -> (cos, sin)
    visual_token_span: Callable[[], tuple[int, int]] | None = None  # [start, end) of the visual tokens
    # Layers leave the model in aligned groups of this many (SmolVLA: an expert layer's attention kind
    # follows its index, period `self_attn_every_n_layers`), through `remove_layers(indices) -> undo` where
    # the policy must do more than shrink `layers` (None: layer_prune's own).
    prune_group: int = 1
    remove_layers: Callable[[list[int]], Callable[[], None]] | None = None
    # Its prefix pass fills a KV cache that the action head attends to (pi0): a method replacing `module`'s
    # forward must fill it for every prefix token, and no layer may drop tokens the others keep.
    caches_prefix: bool = False


@dataclass
class HeadBlock:
    """One block of an action head: branches whose outputs may be cached across denoising steps, in
    execution order (an FFN branch is named "mlp"), and the module computing its modulation from the
    conditioning (adaLN), if any."""

    branches: dict[str, nn.Module]
    modulation: nn.Module | None = None


@dataclass
class DenoisingHead:
    """A diffusion / flow-matching action head."""

    step: nn.Module  # called once per denoising step: forward(noisy_actions, t, cognition), t = s / steps
    # (or as `is_prefix` / `step_index` say)
    steps: int
    blocks: Sequence[HeadBlock]
    # (t [N], cognition [N, D]) -> what every block's modulation reads; lets methods batch all steps
    condition: Callable[[Any, Any], Any] | None = None
    # For a `step` module that is also called for the prefix (SmolVLA's VLM-with-expert): (args, kwargs) of a
    # call -> whether it is that prefix pass. Then the steps are counted from it rather than read from t.
    is_prefix: Callable[[tuple, dict], bool] | None = None
    # (args, kwargs) of a call -> which denoising step it is, for a `step` that is not called with
    # t = s / steps (a DDPM / DDIM UNet takes the scheduler's integer timestep).
    step_index: Callable[[tuple, dict], int] | None = None
    # Actions as the robot takes them [L, A] (numpy) -> the head's action space [L, A] (torch, normalised): what
    # real-time chunking guides the chunk towards. Only for a `step` that predicts the flow-matching velocity of
    # the Euler loop x <- x + v / steps from noise at t = 0 to actions at t = 1.
    actions_in: Callable[[np.ndarray], Any] | None = None

    def step_of(self, args: tuple, kwargs: dict, last: int) -> int:
        """Which denoising step a call of `step` with (args, kwargs) is, -1 for the prefix pass; `last`: the
        previous call's."""
        if self.is_prefix is not None:
            return -1 if self.is_prefix(args, kwargs) else last + 1
        if self.step_index is not None:
            return self.step_index(args, kwargs)
        return int(round(float(args[1].reshape(-1)[0]) * self.steps))


@dataclass
class ARDecoder:
    """Autoregressive decoding of action tokens after the prefix."""

    loop: nn.Module  # forward(prefix_embeds, mask) -> tokens [B, num_tokens] (greedy)
    num_tokens: int
    # (embeds, attention mask over cache + embeds, KV cache or None) -> (hidden [B, T, D], cache); the cache
    # has `crop(n)` (transformers' DynamicCache)
    forward: Callable[[Any, Any, Any], tuple[Any, Any]]
    embed_tokens: Callable[[Any], Any]  # action tokens [B, T] -> LM input embeddings
    logits: Callable[[Any], Any]  # hidden [..., D] -> action-token logits


@dataclass
class PolicyStructure:
    """Everything acceleration methods may touch, declared by the policy: a method reads these and never a
    policy's private attributes. A policy fills in what it has and leaves the rest None; a method that
    needs a point the policy lacks fails with an error naming both (see `require`)."""

    vision_encoder: nn.Module | None = None  # images -> visual tokens (called once per inference)
    # The module whose output, [B, N, D], is the visual tokens as they enter the language model (token
    # selection before the LM, for policies whose LM cannot be cut into at a layer); per camera.
    visual_tokens: nn.Module | None = None
    preprocess_images: Callable[[Observation], Any] | None = None  # Observation -> the vision encoder's input
    # Resizes the vision encoder's input to this many pixels per side, returns the undo (a policy whose
    # encoder takes several sizes; it refuses the sizes it cannot take).
    vision_resolution: Callable[[int], Callable[[], None]] | None = None
    language_model: LanguageModel | None = None
    denoising_head: DenoisingHead | None = None
    ar_decoder: ARDecoder | None = None
    # What an execution backend compiles (vla_runtime/execution.py); None: the vision encoder, the language
    # model's module and the denoising step, where declared.
    hot_paths: Sequence[nn.Module] | None = None
    weights: nn.Module | None = None  # every weight of the policy: names calibration artifacts
    checkpoint_dir: Path | None = None  # where its weights came from (None: random weights); artifacts go here

    def available(self) -> list[str]:
        return [name for name in HOOK_POINTS if getattr(self, name) is not None]

    def missing(self, points: Sequence[str]) -> list[str]:
        """The hook points of `points` this policy does not declare."""
        return [point for point in points if getattr(self, point, None) is None]

    def require(self, point: str, who: str) -> Any:
        value = getattr(self, point, None)
        if value is None:
            raise ValueError(
                f"{who} needs the hook point '{point}', which this policy does not declare "
                f"(it declares: {', '.join(self.available()) or 'none'})"
            )
        return value


HOOK_POINTS = ("vision_encoder", "preprocess_images", "vision_resolution", "visual_tokens", "language_model",
               "denoising_head", "ar_decoder")


@runtime_checkable
class Policy(Protocol):
    """Anything that maps an observation to a chunk of actions, declaring what it is (`spec`) and what
    acceleration methods may hook into (`structure`)."""

    spec: PolicySpec
    structure: PolicyStructure

    def reset(self) -> None: ...

    def predict_chunk(self, obs: Observation) -> ActionChunk: ...
