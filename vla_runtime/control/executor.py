"""The synchronous protocol, for a simulator that waits for the policy and for logged episodes: the one
predict loop behind vla-eval (sync), vla-collect, calibration observations and vla-replay.

Each step the executor hands out the next action of the current chunk; when none is left it asks the
reuse gate whether the last chunk still holds, else the policy for a new chunk, and queues its first
`actions_per_chunk` actions (all when None).

`latency_ticks` (vla-replay) plays a latency into this open loop: the first `latency_ticks` actions after a call
are the previous chunk's next ones (what the robot runs while the policy computes), and each request carries
them as a `ChunkPrefix`, which a policy with real-time chunking follows (others ignore it).
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque

import numpy as np

from vla_runtime.control.reuse import NeverReuse, ReuseGate
from vla_runtime.types import ActionChunk, ChunkPrefix, Observation, Policy


def policy_view(policy: Policy, obs: Observation) -> Observation:
    """What the policy may see: simulator state only for the privileged (scripted experts)."""
    return obs if policy.spec.privileged else obs.without_privileged_state()


class SyncExecutor:
    def __init__(self, policy: Policy, actions_per_chunk: int | None = None, gate: ReuseGate | None = None,
                 latency_ticks: int | None = None):
        self.policy = policy
        self.actions_per_chunk = actions_per_chunk
        self.gate = gate or NeverReuse()
        self.latency_ticks = latency_ticks
        self.boundary_jumps: list[float] = []  # |first action of a new chunk - last of the previous| (L2)
        self._last_action: np.ndarray | None = None
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
        self._last_action = None

    @property
    def needs_observation(self) -> bool:
        """Whether the next `act` consults the policy (or the gate): only then does it read images."""
        return not self.queue

    def act(self, obs: Observation) -> np.ndarray:
        if not self.queue:
            if self.last_chunk is not None and self._reuse(obs):
                self.reuses += 1
            else:
                self._call(policy_view(self.policy, obs))
        action = self.queue.popleft()
        self._last_action = action
        return action

    def _call(self, obs: Observation) -> None:
        leftover = self.last_chunk.actions[self.actions_per_chunk or len(self.last_chunk.actions):] \
            if self.last_chunk is not None else np.zeros((0, 0))
        late = min(self.latency_ticks or 0, len(leftover))
        if self.latency_ticks is not None and len(leftover):
            obs = dataclasses.replace(obs, prefix=ChunkPrefix(leftover, self.latency_ticks))
        started = time.perf_counter()
        self.last_chunk = self.policy.predict_chunk(obs)
        self.latency_s.append(time.perf_counter() - started)
        self.gate.on_inference(obs, self.last_chunk)
        actions = self.last_chunk.actions[: self.actions_per_chunk]
        if late:  # the robot runs the previous chunk until this one arrives
            actions = np.concatenate([leftover[:late], actions[late:]])
        if self._last_action is not None and late < len(actions):
            previous = actions[late - 1] if late else self._last_action
            self.boundary_jumps.append(float(np.linalg.norm(actions[late] - previous)))
        self.queue.extend(actions)

    def _reuse(self, obs: Observation) -> bool:
        if isinstance(self.gate, NeverReuse):
            return False
        started = time.perf_counter()
        reuse = self.gate.should_reuse(obs, self.last_chunk)
        self.gate_s.append(time.perf_counter() - started)
        return reuse
