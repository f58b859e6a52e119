"""The last thing between the policy and the robot: limits, rate limits, NaN guard, watchdog, e-stop."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np


@dataclass
class SafetyConfig:
    action_low: list[float] = field(default_factory=lambda: [-1.0, -1.0, -1.0, -1.0])
    action_high: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    max_delta_per_tick: float | None = None  # largest change of any dimension between two ticks
    stale_observation_s: float = 0.5  # watchdog: hold when the newest observation is older than this
    # The safe action: zero in every dimension (for Meta-World: no end-effector motion) except
    # `hold_dims`, which keep the last command sent (the gripper stays as closed as it was).
    hold_dims: list[int] = field(default_factory=lambda: [3])

    def __post_init__(self) -> None:
        if len(self.action_low) != len(self.action_high):
            raise ValueError("action_low and action_high differ in length")
        if np.any(np.asarray(self.action_low) > np.asarray(self.action_high)):
            raise ValueError(f"action_low {self.action_low} exceeds action_high {self.action_high}")
        if any(not 0 <= d < len(self.action_low) for d in self.hold_dims):
            raise ValueError(f"hold_dims {self.hold_dims} outside the {len(self.action_low)} action dimensions")


class SafetyLayer:
    """`filter` turns whatever the queue produced (an action, or None on a miss) into a command.
    Every time it substitutes the safe action it counts why, in `events`."""

    def __init__(self, config: SafetyConfig):
        self.config = config
        self.low = np.asarray(config.action_low, dtype=np.float32)
        self.high = np.asarray(config.action_high, dtype=np.float32)
        self.last_command = np.clip(np.zeros_like(self.low), self.low, self.high)
        self.estopped = False
        self.events: Counter[str] = Counter()

    def estop(self) -> None:
        """Latches: nothing but the safe action leaves the layer until `reset`."""
        self.estopped = True
        self.events["estop"] += 1

    def reset(self) -> None:
        self.estopped = False
        self.last_command = np.clip(np.zeros_like(self.low), self.low, self.high)

    def safe_action(self) -> np.ndarray:
        safe = np.clip(np.zeros_like(self.low), self.low, self.high)
        safe[self.config.hold_dims] = self.last_command[self.config.hold_dims]
        return safe

    def _hold(self, reason: str) -> tuple[np.ndarray, str]:
        self.events[reason] += 1
        self.last_command = self.safe_action()
        return self.last_command.copy(), reason

    def filter(self, action: np.ndarray | None, observation_age_s: float) -> tuple[np.ndarray, str]:
        """-> (command, what happened: 'ok', 'clipped', 'miss', 'fault', 'stale', 'estop')."""
        if self.estopped:
            return self.safe_action(), "estop"
        if action is None:
            return self._hold("miss")
        action = np.asarray(action, dtype=np.float32).reshape(-1)
        if action.shape != self.low.shape or not np.all(np.isfinite(action)):
            return self._hold("fault")
        if observation_age_s > self.config.stale_observation_s:
            return self._hold("stale")
        command = np.clip(action, self.low, self.high)
        if self.config.max_delta_per_tick is not None:
            step = self.config.max_delta_per_tick
            command = np.clip(command, self.last_command - step, self.last_command + step)
        status = "ok" if np.array_equal(command, action) else "clipped"
        if status == "clipped":
            self.events["clipped"] += 1
        self.last_command = command
        return command.copy(), status
