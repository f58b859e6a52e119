"""The real-time control loop, top to bottom.

Every control tick, on a fixed schedule (tick n is due at start + n / control_hz, so lateness never
accumulates):
  1. take the chunk the inference worker finished, if any, and merge it into the action queue
     (actions whose tick already passed are discarded);
  2. when the request rule says so (by default as soon as the latency allows: with one request in flight, as
     soon as the previous chunk lands; at least once the policy's executed horizon has run, counting the chunks
     already asked for as if they had arrived) and fewer than `max_in_flight` requests are in flight, let the
     reuse gate extend the last chunk, or ask the worker for a new chunk from the newest observation (with
     `chunking=rtc` / `rtc_trained`, the observation carries what is left of the current chunk and the expected
     delay in ticks: real-time chunking). More than one request in flight (pipelining) keeps the queue fed when
     a request takes longer than what is left of a chunk;
  3. pop this tick's action; an empty queue is a deadline miss (before the first chunk ever arrives, a
     startup hold);
  4. the safety layer turns it into a command (the safe action on a miss, NaN, stale observation or
     e-stop) and the robot gets it.
Nothing the policy or the worker raises stops the loop: errors are counted and the robot held.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from vla_runtime.control.action_queue import ActionQueue
from vla_runtime.control.governor import BudgetGovernor
from vla_runtime.control.inference import InferenceResult
from vla_runtime.control.metrics import LoopMetrics
from vla_runtime.control.reuse import NeverReuse, ReuseGate
from vla_runtime.control.rtc import DelayEstimator, FixedDelay, RTCConfig
from vla_runtime.control.safety import SafetyConfig, SafetyLayer
from vla_runtime.plugins import did_you_mean
from vla_runtime.types import ActionChunk, ChunkPrefix, Observation, PolicySpec

CHUNKING = ("naive", "rtc", "rtc_trained", "auto")
REQUEST_RULES = ("asap", "latency", "count")


class Robot(Protocol):
    def observation_age_s(self) -> float:
        """How old the newest available observation is; cheap (the watchdog asks every tick)."""

    def observe(self) -> Observation: ...

    def send(self, command: np.ndarray) -> None: ...


class InferenceWorker(Protocol):
    in_flight: int  # requests asked for whose chunk was not polled yet

    def request(self, obs: Observation, tick: int) -> bool: ...

    def poll(self, tick: int) -> InferenceResult | None: ...


class MonotonicClock:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.start

    def sleep_until(self, t: float) -> None:
        remaining = t - self.now()
        if remaining > 0:
            time.sleep(remaining)


class SimulatedClock:
    """Simulated time: sleeping is instant, so a simulator can run slower or faster than real time."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def sleep_until(self, t: float) -> None:
        self.t = max(self.t, t)


@dataclass
class RuntimeConfig:
    control_hz: float = 80.0
    # When to ask for a new chunk, the chunks in flight counted as queued from their request's tick on:
    # "asap": as often as the latency allows, every ceil(L / max_in_flight) ticks with L the median of the recent
    #   latencies in ticks (one request in flight: as soon as the previous chunk lands), so each chunk answers as
    #   fresh a frame as the lanes can compute; and whenever "latency" would. With no latency (L = 0) that is the
    #   synchronous cadence: realtime at 0 ms executes what sync does;
    # "latency": when the queued actions last less than the predicted latency (p95 of the recent calls) plus a
    #   tick, or when at most `request_threshold` are left (replanned early enough, and at least that early);
    # "count": only at `request_threshold`.
    request_when: str = "asap"
    # None: the policy's own receding horizon, resolved by `for_policy`: ask again once the actions it executes
    # per chunk (spec.actions_per_chunk) have run, as the synchronous protocol does.
    request_threshold: int | None = None
    # Actions of each chunk that are queued (None: all). The whole chunk, so that what is left of it covers the
    # latency of the next request; what is already late when a chunk arrives is dropped.
    execute_horizon: int | None = None
    merge: str = "replace"
    ensemble_decay: float = 0.01
    old_weight: float = 0.3
    # naive: a new chunk is computed from the observation alone; rtc: guided towards the actions that still run
    # meanwhile (the policy wrapped by control.rtc.chunked, RealTimeChunking with `rtc`'s settings); rtc_trained:
    # the policy continues those actions itself (trained for it: PolicySpec.rtc_max_delay); auto: rtc_trained for
    # a policy trained for it, else naive (resolved by `for_policy`).
    chunking: str = "auto"
    # Requests in flight at once (pipelining); None: as many as the policy computes at once
    # (PolicySpec.concurrent_requests: 1 for a model in this process, a vla-serve's slots for policy=remote).
    # Simulated latency (vla-eval realtime) models that many servers, each request taking the model's latency.
    max_in_flight: int | None = None
    # The policy's chunk length (set by `for_policy`): how far a request in flight will feed the queue.
    chunk_size: int | None = None
    rtc: RTCConfig = field(default_factory=RTCConfig)
    warmup_calls: int = 1  # first policy calls of a process left out of the delay estimate (rtc)
    safety: SafetyConfig = field(default_factory=SafetyConfig)

    def __post_init__(self) -> None:
        if isinstance(self.safety, dict):
            self.safety = SafetyConfig(**self.safety)
        if isinstance(self.rtc, dict):
            self.rtc = RTCConfig(**self.rtc)
        if self.chunking not in CHUNKING:
            raise ValueError(f"Unknown chunking '{self.chunking}'{did_you_mean(self.chunking, CHUNKING)}; "
                             f"choose one of {', '.join(CHUNKING)}")
        if self.chunking not in ("naive", "auto") and self.merge != "replace":
            raise ValueError(f"chunking={self.chunking} makes the new chunk agree with the queued actions itself; "
                             f"it takes merge=replace, not '{self.merge}'")
        if self.control_hz <= 0:
            raise ValueError(f"control_hz must be positive, got {self.control_hz}")
        if self.request_when not in REQUEST_RULES:
            raise ValueError(f"request_when must be one of {', '.join(REQUEST_RULES)}, got '{self.request_when}'"
                             f"{did_you_mean(self.request_when, REQUEST_RULES)}")
        for name, least in (("request_threshold", 0), ("execute_horizon", 1), ("max_in_flight", 1)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < least):
                raise ValueError(f"{name} must be an integer >= {least} or null, got {value!r}")

    def for_policy(self, spec: PolicySpec, actions_per_chunk: int | None = None) -> RuntimeConfig:
        """This config resolved for a policy: a `request_threshold` of None as the queued actions beyond the ones
        it executes per chunk (`actions_per_chunk`, else its spec's), so it replans as often as it would
        synchronously and the rest of the chunk runs meanwhile; `chunking=auto` and `max_in_flight=None` as its
        spec says."""
        threshold = self.request_threshold
        if threshold is None:
            queued = min(self.execute_horizon or spec.chunk_size, spec.chunk_size)
            threshold = queued - min(actions_per_chunk or spec.actions_per_chunk or queued, queued)
        chunking = self.chunking
        if chunking == "auto":
            chunking = "rtc_trained" if spec.rtc_max_delay else "naive"
        return dataclasses.replace(self, request_threshold=threshold, chunking=chunking, chunk_size=spec.chunk_size,
                                   max_in_flight=self.max_in_flight or spec.concurrent_requests)


class ControlLoop:
    def __init__(self, robot: Robot, worker: InferenceWorker, config: RuntimeConfig,
                 clock: MonotonicClock | SimulatedClock | None = None, reuse_gate: ReuseGate | None = None,
                 governor: BudgetGovernor | None = None, set_profile: Callable[[str], None] | None = None,
                 delays: DelayEstimator | FixedDelay | None = None):
        self.robot = robot
        self.worker = worker
        if config.request_threshold is None or config.chunking == "auto" or config.max_in_flight is None:
            raise ValueError("RuntimeConfig is not resolved for a policy (request_threshold, chunking=auto or "
                             "max_in_flight left to it): resolve it with config.for_policy(policy.spec)")
        self.config = config
        self.clock = clock or MonotonicClock()
        self.period = 1.0 / config.control_hz
        self.reuse_gate = reuse_gate or NeverReuse()
        self.governor = governor
        self.set_profile = set_profile
        self.action_queue = ActionQueue(config.merge, config.ensemble_decay, config.old_weight)
        self.safety = SafetyLayer(config.safety)
        self.metrics = LoopMetrics()
        self.metrics.safety_events = self.safety.events  # live: diagnostics read it while the loop runs
        # The delay estimate outlives one run when given (an evaluation's episodes share the process's warm-up).
        self.delays = delays or DelayEstimator(self.period, config.warmup_calls)
        self.last_chunk: ActionChunk | None = None
        self._last_request_tick = -1  # of the newest chunk queued (older ones arriving later are stale)
        self._requests: dict[int, Observation] = {}  # in flight: request tick -> its observation (the reuse gate)
        self._last_action: np.ndarray | None = None  # the last action executed, for the boundary jumps
        self._recent: list[np.ndarray] = []  # the last three executed in a row, for the jerk
        self._motion = np.ones(0, dtype=bool)  # the dimensions jerk is measured on (not the held ones)
        self._chunk_changed = False  # a chunk was queued since the last executed action
        self._stop = False

    def estop(self) -> None:
        self.safety.estop()

    def stop(self) -> None:
        self._stop = True

    @property
    def stop_requested(self) -> bool:
        return self._stop

    def _predicted_latency_s(self, percentile: float) -> float:
        """That percentile of this run's last 20 calls; before its first, of the calls the delay estimate saw (an
        evaluation's earlier episodes), so a pipelined episode can start with several requests in flight."""
        recent = self.metrics.inference_latency_s[-20:] or self.delays.latencies_s
        return float(np.percentile(recent, percentile)) if recent else 0.0

    def wants_inference(self, tick: int) -> bool:
        """Whether this tick asks for a chunk (or the reuse gate), given the actions left after the last tick, the
        chunks in flight counted as queued from their request's tick on (`RuntimeConfig.request_when`)."""
        if self.worker.in_flight >= self.config.max_in_flight:
            return False
        chunk = len(self.last_chunk.actions) if self.last_chunk is not None else self.config.chunk_size or 1
        queued = min(self.config.execute_horizon or chunk, chunk)  # what a request feeds the queue from its tick on
        actions_left = len(self.action_queue)
        if self._requests:
            actions_left = max(actions_left, max(self._requests) + queued - tick)
        if actions_left <= self.config.request_threshold:
            return True
        if self.config.request_when == "count":
            return False
        if actions_left * self.period <= self._predicted_latency_s(95) + self.period:
            return True
        latency_ticks = math.ceil(self._predicted_latency_s(50) / self.period - 1e-9)
        since_request = queued - actions_left  # ticks since the newest request (or reuse)
        return self.config.request_when == "asap" and latency_ticks > 0 and \
            since_request >= math.ceil(latency_ticks / self.config.max_in_flight)

    def _queue(self, first_tick: int, chunk: ActionChunk, now: int) -> None:
        self.action_queue.merge(first_tick, chunk.actions[: self.config.execute_horizon], now)
        self._chunk_changed = True

    def _with_prefix(self, obs: Observation, tick: int) -> Observation:
        """rtc: the request carries the actions queued from this tick on and the delay expected before its
        chunk arrives (kept below the chunk's length: a longer one would leave the new chunk nothing to do)."""
        if self.config.chunking == "naive" or self.last_chunk is None:
            return obs
        leftover = self.action_queue.upcoming(tick)
        if not len(leftover):
            return obs
        delay = self.delays.ticks()
        horizon = len(self.last_chunk.actions)
        if delay >= horizon:
            delay = horizon - 1
            self.metrics.rtc_delay_clamped += 1
        self.metrics.rtc_delays.append(delay)
        return dataclasses.replace(obs, prefix=ChunkPrefix(leftover, delay))

    def _execute(self, action: np.ndarray | None) -> None:
        """Bookkeeping of the action this tick executes (None: a miss)."""
        if action is None:
            if self.last_chunk is None:
                self.metrics.startup_holds += 1  # waiting for the very first chunk is not a missed deadline
            else:
                self.metrics.misses += 1
            self._recent = []  # a hold breaks the chain the jerk is measured on
            return
        if self._chunk_changed and self._last_action is not None:
            self.metrics.boundary_jumps.append(float(np.linalg.norm(action - self._last_action)))
        self._chunk_changed = False
        self._last_action = action
        self._recent = [*self._recent[-2:], action]
        if len(self._recent) == 3:
            if len(self._motion) != len(action):
                self._motion = ~np.isin(np.arange(len(action)), self.config.safety.hold_dims)
            oldest, middle, _ = self._recent
            self.metrics.jerk_sum += float(np.linalg.norm((action - 2 * middle + oldest)[self._motion]))
            self.metrics.jerk_ticks += 1

    def _collect(self, tick: int) -> None:
        while (result := self.worker.poll(tick)) is not None:
            self._receive(result, tick)

    def _receive(self, result: InferenceResult, tick: int) -> None:
        requested = self._requests.pop(result.request_tick, None)
        if result.error is not None or result.chunk is None:
            self.metrics.policy_errors.append(result.error or "policy returned no chunk")
            return
        self.metrics.inference_latency_s.append(result.latency_s)
        self.metrics.compute_s.append(result.compute_s)
        self.delays.observe(result.latency_s)
        if result.request_tick < self._last_request_tick:
            self.metrics.stale_chunks += 1  # overtaken by a newer request's chunk: its observation is older
            return
        self._last_request_tick = result.request_tick
        self.last_chunk = result.chunk
        self.reuse_gate.on_inference(requested, result.chunk)
        self._queue(result.request_tick, result.chunk, now=tick)
        if self.governor is not None:
            before = self.governor.current.name
            profile = self.governor.observe(1000 * result.latency_s)
            if profile.name != before:
                self.metrics.profile_switches.append({"tick": tick, "from": before, "to": profile.name})
                if self.set_profile is not None:
                    self.set_profile(profile.name)

    def step(self, tick: int, observe: Callable[[], Observation]) -> np.ndarray | None:
        """Steps 1-3 of a tick: the finished chunk merged; when due, the last chunk reused or a new one asked for
        from `observe()`; this tick's action popped (None: a deadline miss or a startup hold). `run` steps it on
        the clock; the synchronous protocol (control/executor.py) steps it as the world waits."""
        self._collect(tick)
        if self.wants_inference(tick):
            obs = observe()
            if self.last_chunk is not None and not self._requests and self._reuse(obs):
                self.metrics.reuses += 1
                self._queue(tick, self.last_chunk, now=tick)
            elif self.worker.request(self._with_prefix(obs, tick), tick):
                self._requests[tick] = obs
                self.metrics.max_in_flight = max(self.metrics.max_in_flight, self.worker.in_flight)
                self._collect(tick)  # a worker with no latency answers within the tick
        action = self.action_queue.pop(tick)
        self._execute(action)
        return action

    def _reuse(self, obs: Observation) -> bool:
        if isinstance(self.reuse_gate, NeverReuse):
            return False
        started = time.perf_counter()
        reuse = self.reuse_gate.should_reuse(obs, self.last_chunk)
        self.metrics.gate_s.append(time.perf_counter() - started)
        return reuse

    def run(self, max_ticks: int, done: Callable[[], bool] = lambda: False) -> LoopMetrics:
        """Runs until `max_ticks`, `done()`, `stop()` or an e-stop; returns this run's metrics."""
        start = self.clock.now()
        for tick in range(max_ticks):
            if self._stop or done() or self.safety.estopped:
                break
            deadline = start + tick * self.period
            self.clock.sleep_until(deadline)
            self.metrics.tick_jitter_s.append(max(0.0, self.clock.now() - deadline))

            action = self.step(tick, self.robot.observe)
            command, _ = self.safety.filter(action, self.robot.observation_age_s())
            if self.safety.estopped:
                break  # e-stop: not one more command
            self.robot.send(command)
            self.metrics.ticks += 1
        self.metrics.discarded_actions = self.action_queue.discarded
        return self.metrics
