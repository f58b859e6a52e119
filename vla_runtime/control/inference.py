"""Inference workers: who runs the policy, and when its chunk reaches the executor.

`ThreadedInferenceWorker` runs the policy in a thread on the wall clock (a robot). The executor
never waits for it. `SimulatedInferenceWorker` runs the policy at once but delivers the chunk
`latency` later in simulated time, so latency-in-the-loop evaluations are reproducible.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vla_runtime.types import ActionChunk, Observation, Policy

log = logging.getLogger(__name__)


@dataclass
class InferenceResult:
    request_tick: int  # the tick whose observation the chunk answers; its first action is for this tick
    chunk: ActionChunk | None
    latency_s: float  # what the loop experienced (the latency model's value when there is one)
    compute_s: float  # what the policy call really took
    error: str | None = None


class LatencyModel:
    """`measured`: the call's own wall-clock time. `fixed`: always `latency_ms`. `recorded`: draws
    from a recorded list of latencies (json: a list of ms, or an object with `latency_samples_ms`)."""

    def __init__(self, kind: str = "measured", latency_ms: float = 0.0, recorded_path: str | None = None,
                 seed: int = 0):
        if kind not in ("measured", "fixed", "recorded"):
            raise ValueError(f"Unknown latency model '{kind}'; use measured, fixed or recorded")
        if kind == "fixed" and latency_ms < 0:
            raise ValueError(f"latency_ms must be >= 0, got {latency_ms}")
        self.kind = kind
        self.latency_s = latency_ms / 1000.0
        self.samples_s: np.ndarray | None = None
        if kind == "recorded":
            self.samples_s = self._load(recorded_path)
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    @staticmethod
    def _load(path: str | None) -> np.ndarray:
        if not path:
            raise ValueError("latency_model=recorded needs runtime.recorded_latencies=<json file>")
        try:
            content = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"Cannot read recorded latencies from {path}: {exc}") from exc
        samples = content.get("latency_samples_ms") if isinstance(content, dict) else content
        values = np.asarray(samples if samples is not None else [], dtype=float)
        if values.ndim != 1 or len(values) == 0 or not np.all(np.isfinite(values)) or np.any(values < 0):
            raise ValueError(f"{path}: expected a non-empty list of latencies in ms (>= 0)")
        return values / 1000.0

    def reset(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    def latency(self, measured_s: float) -> float:
        if self.kind == "measured":
            return measured_s
        if self.kind == "fixed":
            return self.latency_s
        return float(self._rng.choice(self.samples_s))


class _ThrottledWarning:
    """A failing policy fails on every call (10 a second and more): the first failure is logged at once,
    then at most one line per `interval_s` saying how many were not."""

    def __init__(self, interval_s: float = 10.0):
        self.interval_s = interval_s
        self._last_s = -float("inf")
        self._suppressed = 0
        self._lock = threading.Lock()

    def __call__(self, message: str) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last_s < self.interval_s:
                self._suppressed += 1
                return
            suppressed, self._suppressed, self._last_s = self._suppressed, 0, now
        log.warning("policy call failed: %s%s", message,
                    f" ({suppressed} more failures in the last {self.interval_s:g} s)" if suppressed else "")


def _call_policy(policy: Policy, obs: Observation,
                 warn: _ThrottledWarning) -> tuple[ActionChunk | None, float, str | None]:
    started = time.perf_counter()
    try:
        chunk, error = policy.predict_chunk(obs), None
    except Exception as exc:  # the loop counts it and holds the robot; it must not die of it
        chunk, error = None, f"{type(exc).__name__}: {exc}"
        warn(error)
    return chunk, time.perf_counter() - started, error


class SimulatedInferenceWorker:
    """`lanes` requests computed at once (pipelining: `RuntimeConfig.max_in_flight`), each delivered its latency
    after its request; the policy itself runs at once, one call after the other."""

    def __init__(self, policy: Policy, latency_model: LatencyModel, control_period_s: float, lanes: int = 1):
        if lanes < 1:
            raise ValueError(f"an inference worker needs at least one lane, got {lanes}")
        self.policy = policy
        self.latency_model = latency_model
        self.period = control_period_s
        self.lanes = lanes
        self.warn = _ThrottledWarning()  # each worker its own: one failing policy does not silence another's
        self._pending: list[tuple[int, InferenceResult]] = []  # (delivery tick, result), in order of delivery

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def request(self, obs: Observation, tick: int) -> bool:
        if len(self._pending) >= self.lanes:
            return False
        chunk, compute_s, error = self._call(obs)
        latency_s = self._latency(compute_s)
        # Rounded up: a chunk that is 1 ms late for a tick misses that tick. (The epsilon keeps float
        # noise, e.g. 0.1 / 0.0125 = 8.000000001, from costing a whole tick.)
        delivery = tick + math.ceil(latency_s / self.period - 1e-9)
        self._pending.append((delivery, InferenceResult(tick, chunk, latency_s, compute_s, error)))
        self._pending.sort(key=lambda pending: pending[0])  # stable: requests due at one tick keep their order
        return True

    def _call(self, obs: Observation) -> tuple[ActionChunk | None, float, str | None]:
        return _call_policy(self.policy, obs, self.warn)

    def _latency(self, compute_s: float) -> float:
        return self.latency_model.latency(compute_s)

    def poll(self, tick: int) -> InferenceResult | None:
        """The earliest chunk due by `tick` (call again for the next), or None."""
        if not self._pending or self._pending[0][0] > tick:
            return None
        return self._pending.pop(0)[1]

    def close(self) -> None:
        pass


class SyncWorker(SimulatedInferenceWorker):
    """The synchronous protocol's worker: the control loop with zero latency (control/executor.py). The policy
    runs when asked and what it raises propagates: the world waits for it, so a failing policy ends the episode
    instead of holding a robot. With `latency_ticks` (a latency played into an open loop, vla-replay) each chunk
    arrives that many ticks after its request, except an episode's first, which the episode waits for."""

    def __init__(self, policy: Policy, latency_ticks: int = 0):
        super().__init__(policy, LatencyModel("fixed", 1000.0 * latency_ticks), control_period_s=1.0)
        self._first = True

    def _call(self, obs: Observation) -> tuple[ActionChunk, float, None]:
        started = time.perf_counter()
        chunk = self.policy.predict_chunk(obs)
        return chunk, time.perf_counter() - started, None

    def _latency(self, compute_s: float) -> float:
        first, self._first = self._first, False
        return 0.0 if first else self.latency_model.latency_s


class ThreadedInferenceWorker:
    """The policy on `lanes` threads (pipelining: `RuntimeConfig.max_in_flight`), at most as many as the policy
    computes at once (`PolicySpec.concurrent_requests`: a model in this process one, a policy server its slots)."""

    def __init__(self, policy: Policy, latency_model: LatencyModel | None = None, lanes: int = 1):
        if not 1 <= lanes <= policy.spec.concurrent_requests:
            raise ValueError(f"max_in_flight={lanes}, but this policy computes {policy.spec.concurrent_requests} "
                             "request(s) at once (a model in this process: 1); more in flight needs a policy "
                             "server with as many slots (vla-serve slots=N, policy=remote)")
        self.policy = policy
        self.latency_model = latency_model or LatencyModel("measured")
        self.warn = _ThrottledWarning()
        self._lock = threading.Lock()
        self._requests: queue.SimpleQueue[tuple[Observation, int] | None] = queue.SimpleQueue()
        self._results: list[InferenceResult] = []
        self._in_flight = 0
        self._threads = [threading.Thread(target=self._serve, name=f"inference-worker-{index}", daemon=True)
                         for index in range(lanes)]
        for thread in self._threads:
            thread.start()

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def request(self, obs: Observation, tick: int) -> bool:
        with self._lock:
            if self._in_flight >= len(self._threads):
                return False
            self._in_flight += 1
        self._requests.put((obs, tick))
        return True

    def poll(self, tick: int) -> InferenceResult | None:
        """The first chunk finished (call again for the next), or None."""
        with self._lock:
            if not self._results:
                return None
            self._in_flight -= 1
            return self._results.pop(0)

    def _serve(self) -> None:
        while (request := self._requests.get()) is not None:
            obs, tick = request
            chunk, compute_s, error = _call_policy(self.policy, obs, self.warn)
            latency_s = self.latency_model.latency(compute_s)
            if latency_s > compute_s:  # a latency model slower than this machine: wait it out
                time.sleep(latency_s - compute_s)
            with self._lock:
                self._results.append(InferenceResult(tick, chunk, latency_s, compute_s, error))

    def close(self) -> None:
        for _ in self._threads:
            self._requests.put(None)
        for thread in self._threads:
            thread.join(timeout=5.0)
