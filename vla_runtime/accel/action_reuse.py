"""FlashVLA-style action reuse: a gate for the control loop's reuse interface.

When the loop is about to ask for a new chunk, the gate encodes the new frame with the policy's vision
encoder only (a fraction of a full inference) and lets the loop replay the last chunk instead when
- the frame's visual tokens are nearly those of the last real inference (mean cosine similarity >=
  `token_similarity`), and
- the actions are stable: the first actions of the last two inferred chunks differ by at most
  `action_tolerance` in every dimension,
and at most `max_consecutive` reuses in a row. `token_similarity > 1` never reuses: the baseline.

The visual tokens of each real inference are captured by a post-forward hook on the vision encoder, so
the gate costs no extra encoder pass for them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vla_runtime.accel.method import AccelMethod, Phase, register_method
from vla_runtime.hooks import Handle, ModelHook, add_hook
from vla_runtime.types import ActionChunk, Observation, Policy


@dataclass
class ActionReuseConfig:
    token_similarity: float = 0.99
    action_tolerance: float = 0.5
    max_consecutive: int = 2

    def __post_init__(self) -> None:
        if self.max_consecutive < 0:
            raise ValueError(f"action_reuse max_consecutive must be >= 0, got {self.max_consecutive}")


class _CaptureTokens(ModelHook):
    """Keeps the vision encoder's output of the last real inference (not of the gate's own calls)."""

    def __init__(self):
        self.tokens: torch.Tensor | None = None
        self.gate_call = threading.local()  # inference may run on a worker thread while the gate runs

    def post_forward(self, module, output):
        if not getattr(self.gate_call, "active", False):
            self.tokens = output.detach()
        return output

    def reset_state(self, module) -> None:
        self.tokens = None


def _token_vectors(features: torch.Tensor) -> torch.Tensor:
    """One feature vector per visual token: [..., D] as it is; a CNN's feature map [B, C, H, W] (ACT's ResNet)
    as its H x W locations' C-vectors, not rows of pixels (after a ReLU many of those are all zero)."""
    if features.dim() == 4:
        features = features.flatten(2).transpose(1, 2)
    return features.flatten(0, -2).float()


class ActionReuseGate:
    """Implements `vla_runtime.control.reuse.ReuseGate`."""

    def __init__(self, policy: Policy, config: ActionReuseConfig, capture: _CaptureTokens):
        self.config = config
        self.encoder = policy.structure.require("vision_encoder", "action_reuse")
        self.preprocess = policy.structure.require("preprocess_images", "action_reuse")
        self.capture = capture
        self.recent_first_actions: list[np.ndarray] = []
        self.consecutive = 0
        self.decisions = 0
        self.reuses = 0

    def reset(self) -> None:
        self.recent_first_actions.clear()
        self.consecutive = 0

    def _actions_stable(self) -> bool:
        if len(self.recent_first_actions) < 2:
            return False
        previous, last = self.recent_first_actions[-2:]
        return float(np.abs(last - previous).max()) <= self.config.action_tolerance

    @torch.inference_mode()
    def _token_similarity(self, obs: Observation) -> float:
        self.capture.gate_call.active = True
        try:
            tokens = self.encoder(self.preprocess(obs))
        finally:
            self.capture.gate_call.active = False
        reference = self.capture.tokens
        if reference is None or reference.shape != tokens.shape:
            return -1.0
        return float(F.cosine_similarity(_token_vectors(tokens), _token_vectors(reference), -1).mean())

    def should_reuse(self, obs: Observation, last_chunk: ActionChunk | None) -> bool:
        self.decisions += 1
        if (self.config.token_similarity > 1 or last_chunk is None
                or self.consecutive >= self.config.max_consecutive or not self._actions_stable()):
            return False
        if self._token_similarity(obs) < self.config.token_similarity:
            return False
        self.consecutive += 1
        self.reuses += 1
        return True

    def on_inference(self, obs: Observation, chunk: ActionChunk) -> None:
        self.consecutive = 0
        self.recent_first_actions = [*self.recent_first_actions[-1:], np.asarray(chunk.actions[0], dtype=np.float32)]


def apply(policy: Policy, config: ActionReuseConfig | None = None, artifact: dict | None = None) -> Handle:
    """The handle's `reuse_gate` goes to the control loop (`ControlLoop(reuse_gate=...)`)."""
    config = config or ActionReuseConfig()
    encoder = policy.structure.require("vision_encoder", "action_reuse")
    capture = _CaptureTokens()
    gate = ActionReuseGate(policy, config, capture)
    return Handle("action_reuse", [add_hook(encoder, "action_reuse", capture)], reuse_gate=gate)


METHOD = register_method(AccelMethod("action_reuse", ActionReuseConfig, apply,
                                     requires=("vision_encoder", "preprocess_images"), phase=Phase.CALLS))
