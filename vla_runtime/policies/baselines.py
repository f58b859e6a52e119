"""Policies every suite has: its scripted expert, and uniform random actions."""

from __future__ import annotations

import numpy as np

from vla_runtime.policies.registry import register_policy
from vla_runtime.types import ActionChunk, Observation, Policy, PolicySpec, PolicyStructure


@register_policy("expert", needs_suite=True)
def expert(suite) -> Policy:
    """The suite's scripted expert (reads simulator state: an upper bound, not a robot policy)."""
    return suite.expert()


class RandomPolicy:
    """Uniform random actions within the robot's action limits ([-1, 1] where it has none); a floor
    for success rates."""

    def __init__(self, spec: PolicySpec, low: np.ndarray, high: np.ndarray, seed: int = 0) -> None:
        self.spec = spec
        self.structure = PolicyStructure()
        self.low, self.high = low, high
        self._rng = np.random.default_rng(seed)

    def reset(self) -> None:
        pass

    def predict_chunk(self, obs: Observation) -> ActionChunk:
        actions = self._rng.uniform(self.low, self.high, size=(self.spec.chunk_size, self.spec.action_dim))
        return ActionChunk(actions, t0=obs.timestamp, dt=self.spec.control_dt)


@register_policy("random", needs_suite=True)
def random(suite, chunk_size: int = 1, seed: int = 0) -> RandomPolicy:
    robot = suite.spec
    spec = PolicySpec(action_dim=robot.action_dim, state_dim=robot.state_dim, chunk_size=int(chunk_size),
                      control_dt=robot.control_dt)
    low = np.asarray(robot.action_low or (-1.0,) * robot.action_dim)
    high = np.asarray(robot.action_high or (1.0,) * robot.action_dim)
    return RandomPolicy(spec, low, high, seed)
