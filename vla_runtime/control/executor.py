"""The synchronous protocol, for a simulator that waits for the policy and for logged episodes: the one
predict loop behind vla-eval (sync), vla-collect, calibration observations and vla-replay.

It is the control loop with zero latency, stepped by the caller one action at a time: the same action queue,
reuse gate, boundary jumps and RTC prefix as in real time (control/loop.py). When the actions of the current
chunk run out it asks the reuse gate whether the last chunk still holds, else the policy, whose chunk is there
within the tick; the first `actions_per_chunk` actions of each are executed (all when None).

`latency_ticks` (vla-replay) plays a latency into this open loop: every chunk after an episode's first arrives
`latency_ticks` ticks after its request, which is made once `actions_per_chunk` actions have run, so the
previous chunk's next actions run meanwhile (what a robot runs while the policy computes); with `chunking` rtc or
rtc_trained each request carries them as a `ChunkPrefix`, which a policy with real-time chunking follows (RTC's
guidance, or one trained for it).
"""

from __future__ import annotations

import numpy as np

from vla_runtime.control.inference import SyncWorker
from vla_runtime.control.loop import ControlLoop, RuntimeConfig
from vla_runtime.control.reuse import NeverReuse, ReuseGate
from vla_runtime.control.rtc import FixedDelay
from vla_runtime.types import ActionChunk, Observation, Policy


def policy_view(policy: Policy, obs: Observation) -> Observation:
    """What the policy may see: simulator state only for the privileged (scripted experts)."""
    return obs if policy.spec.privileged else obs.without_privileged_state()


def sync_config(policy: Policy, actions_per_chunk: int | None, latency_ticks: int | None,
                chunking: str = "naive") -> RuntimeConfig:
    """The loop's settings for the synchronous protocol: without latency, only the executed actions are queued and
    the next chunk is asked for when they ran out; with it, the whole chunk, asked for again when the executed
    ones ran (the rest runs while the next chunk is computed), each request carrying them unless `chunking` is
    naive."""
    if latency_ticks is None:
        return RuntimeConfig(control_hz=1.0, request_when="count", request_threshold=0,
                             execute_horizon=actions_per_chunk, chunking="naive", max_in_flight=1)
    horizon = policy.spec.chunk_size
    executed = min(actions_per_chunk or policy.spec.actions_per_chunk or horizon, horizon)
    if latency_ticks > horizon - executed:
        raise ValueError(f"latency_ticks={latency_ticks} is longer than the {horizon - executed} actions left of a "
                         f"{horizon}-action chunk once {executed} ran: the robot would run out of actions; use at "
                         f"most {horizon - executed} or execute fewer actions per chunk")
    return RuntimeConfig(control_hz=1.0, request_when="count", request_threshold=horizon - executed,
                         chunking=chunking, max_in_flight=1)


class SyncExecutor:
    def __init__(self, policy: Policy, actions_per_chunk: int | None = None, gate: ReuseGate | None = None,
                 latency_ticks: int | None = None, chunking: str = "naive"):
        self.policy = policy
        self.gate = gate or NeverReuse()
        self.latency_ticks = latency_ticks
        self.config = sync_config(policy, actions_per_chunk, latency_ticks, chunking)
        self.reset()

    def reset(self) -> None:
        """A new episode: the policy, the gate and the loop start afresh (the statistics are the episode's)."""
        self.policy.reset()
        self.gate.reset()
        self.loop = ControlLoop(None, SyncWorker(self.policy, self.latency_ticks or 0), self.config,
                                reuse_gate=self.gate, delays=FixedDelay(self.latency_ticks or 0))
        self.tick = 0

    @property
    def needs_observation(self) -> bool:
        """Whether the next `act` consults the policy (or the gate): only then does it read images."""
        return self.loop.wants_inference(self.tick)

    def act(self, obs: Observation) -> np.ndarray:
        action = self.loop.step(self.tick, lambda: policy_view(self.policy, obs))
        if action is None:
            horizon = len(self.last_chunk.actions) if self.last_chunk is not None else 0
            raise ValueError(f"No action for tick {self.tick}: the policy's chunk of {horizon} actions is shorter than "
                             f"what the protocol executes of it ({self.config.execute_horizon or 'its chunk size'})")
        self.tick += 1
        return action

    @property
    def last_chunk(self) -> ActionChunk | None:
        return self.loop.last_chunk

    @property
    def latency_s(self) -> list[float]:
        """What each policy call took."""
        return self.loop.metrics.compute_s

    @property
    def gate_s(self) -> list[float]:
        return self.loop.metrics.gate_s

    @property
    def reuses(self) -> int:
        return self.loop.metrics.reuses

    @property
    def boundary_jumps(self) -> list[float]:
        return self.loop.metrics.boundary_jumps
