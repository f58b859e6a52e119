"""What the control loop counts (`LoopMetrics`), and the two summaries of timings and of chunk-boundary jumps that
its users share (evaluation, replay, the ROS node's diagnostics)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np


@dataclass
class LoopMetrics:
    ticks: int = 0
    misses: int = 0
    startup_holds: int = 0
    inference_latency_s: list[float] = field(default_factory=list)  # what the loop waited (a latency model's)
    compute_s: list[float] = field(default_factory=list)  # what each call really took
    gate_s: list[float] = field(default_factory=list)  # what each reuse decision took (a gate may run the encoder)
    tick_jitter_s: list[float] = field(default_factory=list)
    reuses: int = 0
    policy_errors: list[str] = field(default_factory=list)
    safety_events: Counter = field(default_factory=Counter)
    discarded_actions: int = 0
    profile_switches: list[dict] = field(default_factory=list)
    # |a - a_prev| (L2) between the last action executed from one chunk and the first from the next
    boundary_jumps: list[float] = field(default_factory=list)
    rtc_delays: list[int] = field(default_factory=list)  # the delay (ticks) sent with each rtc request
    rtc_delay_clamped: int = 0  # requests whose estimated delay reached the chunk's length
    # Jerk: |a_t - 2 a_t-1 + a_t-2| (L2, the held dimensions - grippers - left out) over consecutive executed
    # actions: the jerk of the motion per tick^2 where actions command velocities or deltas (all three suites).
    jerk_sum: float = 0.0
    jerk_ticks: int = 0
    stale_chunks: int = 0  # chunks that arrived after a newer request's (pipelining): dropped
    max_in_flight: int = 0  # the most requests in flight at once

    @property
    def policy_calls(self) -> int:
        return len(self.inference_latency_s) + len(self.policy_errors)

    @property
    def faults(self) -> int:
        return self.safety_events["fault"] + len(self.policy_errors)

    def summary(self) -> dict:
        return {
            "ticks": self.ticks, "policy_calls": self.policy_calls, "deadline_misses": self.misses,
            "startup_holds": self.startup_holds,
            "latency_ms": percentiles_ms(self.inference_latency_s),
            "tick_jitter_ms": percentiles_ms(self.tick_jitter_s),
            "faults": self.faults, "policy_errors": len(self.policy_errors),
            "stale_holds": self.safety_events["stale"], "clipped": self.safety_events["clipped"],
            "reuses": self.reuses, "discarded_actions": self.discarded_actions,
            "profile_switches": self.profile_switches,
            "boundary_jumps": [round(jump, 6) for jump in self.boundary_jumps],  # pooled over episodes by callers
            "rtc_delays": list(self.rtc_delays), "rtc_delay_clamped": self.rtc_delay_clamped,
            "jerk_sum": self.jerk_sum, "jerk_ticks": self.jerk_ticks,
            "stale_chunks": self.stale_chunks, "max_in_flight": self.max_in_flight,
        }


def jump_statistics(jumps: list[float]) -> dict[str, float | None]:
    """Mean and p99 of chunk-boundary jumps (None when there are none)."""
    return {"boundary_jump_mean": float(np.mean(jumps)) if jumps else None,
            "boundary_jump_p99": float(np.percentile(jumps, 99)) if jumps else None}


def smoothness(loops: list[dict]) -> dict[str, float | None]:
    """Boundary jumps and the mean jerk, pooled over runs' `LoopMetrics.summary()`s."""
    ticks = sum(loop.get("jerk_ticks", 0) for loop in loops)  # (absent from runs recorded before it was measured)
    return {**jump_statistics([jump for loop in loops for jump in loop["boundary_jumps"]]),
            "jerk_mean": sum(loop.get("jerk_sum", 0.0) for loop in loops) / ticks if ticks else None}


def percentiles_ms(values_s: list[float]) -> dict[str, float | None]:
    """p50 / p95 / p99 in milliseconds of durations given in seconds (None when there are none)."""
    if not values_s:
        return {"p50": None, "p95": None, "p99": None}
    return {f"p{q}": 1000 * float(np.percentile(values_s, q)) for q in (50, 95, 99)}
