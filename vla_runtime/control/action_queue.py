"""Actions waiting for their control tick, and how a new chunk merges with the ones already queued.

Actions are keyed by the integer control tick they are meant for, so "has this action's time passed?"
is an exact comparison, not a float one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vla_runtime.plugins import did_you_mean

MERGE_STRATEGIES = ("replace", "temporal_ensemble", "weighted_average")


@dataclass
class _Slot:
    action: np.ndarray  # what will be executed at this tick
    weight_sum: float  # temporal_ensemble bookkeeping
    weighted_sum: np.ndarray
    predictions: int


class ActionQueue:
    """`replace`: a new chunk replaces every queued action. `temporal_ensemble` (ACT): each tick
    executes the weighted mean of every prediction made for it, the k-th prediction weighted
    exp(-decay * k), so earlier predictions dominate and motion stays smooth. `weighted_average`:
    old_weight * queued + (1 - old_weight) * new where they overlap (LeRobot's aggregate)."""

    def __init__(self, merge: str = "replace", ensemble_decay: float = 0.01, old_weight: float = 0.3):
        if merge not in MERGE_STRATEGIES:
            raise ValueError(f"Unknown chunk merge '{merge}'{did_you_mean(merge, MERGE_STRATEGIES)}; "
                             f"choose one of {', '.join(MERGE_STRATEGIES)}")
        if not 0.0 <= old_weight <= 1.0:
            raise ValueError(f"old_weight must be in [0, 1], got {old_weight}")
        self.merge_strategy = merge
        self.ensemble_decay = ensemble_decay
        self.old_weight = old_weight
        self._slots: dict[int, _Slot] = {}
        self.discarded = 0  # actions dropped because their tick had passed

    def __len__(self) -> int:
        return len(self._slots)

    def clear(self) -> None:
        self._slots.clear()

    def ticks(self) -> list[int]:
        return sorted(self._slots)

    def merge(self, first_tick: int, actions: np.ndarray, now: int) -> int:
        """Queue `actions[i]` for tick `first_tick + i`; those for ticks before `now` are discarded.
        Returns how many were discarded."""
        late = max(0, min(len(actions), now - first_tick))
        self.discarded += late
        fresh = {first_tick + i: np.asarray(a, dtype=np.float32) for i, a in enumerate(actions) if i >= late}
        if self.merge_strategy == "replace":
            self._slots = {tick: _Slot(a, 1.0, a.copy(), 1) for tick, a in fresh.items()}
            return late
        for tick, action in fresh.items():
            slot = self._slots.get(tick)
            if slot is None:
                self._slots[tick] = _Slot(action, 1.0, action.copy(), 1)
            elif self.merge_strategy == "temporal_ensemble":
                weight = math.exp(-self.ensemble_decay * slot.predictions)
                slot.weighted_sum = slot.weighted_sum + weight * action
                slot.weight_sum += weight
                slot.predictions += 1
                slot.action = (slot.weighted_sum / slot.weight_sum).astype(np.float32)
            else:
                slot.action = (self.old_weight * slot.action + (1 - self.old_weight) * action).astype(np.float32)
                slot.predictions += 1
        return late

    def upcoming(self, tick: int) -> np.ndarray:
        """The actions queued for `tick`, `tick + 1`, ... up to the first tick with none, [L, A] (L may be 0)."""
        actions = []
        while tick in self._slots:
            actions.append(self._slots[tick].action)
            tick += 1
        return np.stack(actions) if actions else np.zeros((0, 0), dtype=np.float32)

    def pop(self, tick: int) -> np.ndarray | None:
        """The action for `tick`, or None (a deadline miss). Actions for earlier ticks are dropped."""
        for stale in [t for t in self._slots if t < tick]:
            del self._slots[stale]
            self.discarded += 1
        slot = self._slots.pop(tick, None)
        return None if slot is None else slot.action
