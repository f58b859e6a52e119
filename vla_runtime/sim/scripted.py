"""What scripted experts share: a generator script that yields one action per step from privileged state."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from vla_runtime.types import ActionChunk, Observation, PolicySpec, PolicyStructure


class ScriptedExpert:
    """A policy that runs `_run()`, a generator of actions, one per step; `self._obs` is the observation
    of the step being decided. Subclasses set `spec` (privileged) and `name`, and write `_run()`."""

    spec: PolicySpec
    name: str  # in the error when privileged state is missing

    def __init__(self) -> None:
        self.structure = PolicyStructure()
        self._obs: Observation | None = None
        self._script: Iterator[np.ndarray] | None = None

    def reset(self) -> None:
        self._obs, self._script = None, None

    def predict_chunk(self, obs: Observation) -> ActionChunk:
        if obs.privileged_state is None:
            raise ValueError(f"The {self.name} expert needs Observation.privileged_state (simulator state)")
        self._obs = obs
        if self._script is None:
            self._script = self._run()
        return ActionChunk(next(self._script)[None], t0=obs.timestamp, dt=self.spec.control_dt)

    def _run(self) -> Iterator[np.ndarray]:
        raise NotImplementedError
