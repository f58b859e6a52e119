"""The synchronous protocol, for a simulator that waits for the policy and for logged episodes: the one
predict loop behind vla-eval (sync), vla-collect, calibration observations and vla-replay.

Each step the executor hands out the next action of the current chunk; when none is left it asks the
reuse gate whether the last chunk still holds, else the policy for a new chunk, and queues its first
`actions_per_chunk` actions (all when None).
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from vla_runtime.control.reuse import NeverReuse, ReuseGate
from vla_runtime.types import ActionChunk, Observation, Policy


def policy_view(policy: Policy, obs: Observation) -> Observation:
    """What the policy may see: simulator state only for the privileged (scripted experts)."""
    return obs if policy.spec.privileged else obs.without_privileged_state()


class SyncExecutor:
    def __init__(self, policy: Policy, actions_per_chunk: int | None = None, gate: ReuseGate | None = None):
        self.policy = policy
        self.actions_per_chunk = actions_per_chunk
        self.gate = gate or NeverReuse()
        self.queue: deque[np.ndarray] = deque()
        self.last_chunk: ActionChunk | None = None
        self.latency_s: list[float] = []  # one per policy call
        self.gate_s: list[float] = []  # one per reuse decision (a gate may run the vision encoder)
        self.reuses = 0

    def reset(self) -> None:
        """A new episode: the policy, the gate and the queue start afresh (the statistics are per executor)."""
        self.policy.reset()
        self.gate.reset()
        self.queue.clear()
        self.last_chunk = None

    @property
    def needs_observation(self) -> bool:
        """Whether the next `act` consults the policy (or the gate): only then does it read images."""
        return not self.queue

    def act(self, obs: Observation) -> np.ndarray:
        if not self.queue:
            if self.last_chunk is not None and self._reuse(obs):
                self.reuses += 1
            else:
                obs = policy_view(self.policy, obs)
                started = time.perf_counter()
                self.last_chunk = self.policy.predict_chunk(obs)
                self.latency_s.append(time.perf_counter() - started)
                self.gate.on_inference(obs, self.last_chunk)
            self.queue.extend(self.last_chunk.actions[: self.actions_per_chunk])
        return self.queue.popleft()

    def _reuse(self, obs: Observation) -> bool:
        if isinstance(self.gate, NeverReuse):
            return False
        started = time.perf_counter()
        reuse = self.gate.should_reuse(obs, self.last_chunk)
        self.gate_s.append(time.perf_counter() - started)
        return reuse
