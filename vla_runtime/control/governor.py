"""Budget governor: turn a latency budget into a choice of acceleration profile, and revise it from
the latencies actually measured, with hysteresis so it does not flap."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass
class Candidate:
    """An acceleration profile as the governor sees it."""

    name: str
    latency_ms_p95: float  # measured offline (vla-bench)
    fidelity: float  # higher is better: success rate, or 1 - normalised action error


@dataclass
class Switch:
    call: int  # policy call after which the governor switched
    from_profile: str
    to_profile: str
    reason: str


class BudgetGovernor:
    """Chooses the most faithful profile whose p95 latency fits `budget_ms`; the fastest if none fits.

    Every `window` calls it compares the measured p95 of the current profile with the budget: above
    budget * (1 + hysteresis) it steps down to a faster fitting profile; below budget * (1 - hysteresis)
    it steps up to a more faithful one that fits (by its measured latency where known).
    """

    def __init__(self, profiles: list[Candidate], budget_ms: float, hysteresis: float = 0.1, window: int = 20):
        if not profiles:
            raise ValueError("The governor needs at least one profile")
        if budget_ms <= 0:
            raise ValueError(f"budget_ms must be positive, got {budget_ms}")
        self.profiles = sorted(profiles, key=lambda p: -p.fidelity)  # most faithful first
        self.budget_ms = budget_ms
        self.hysteresis = hysteresis
        self.window = window
        self.expected_ms = {p.name: p.latency_ms_p95 for p in profiles}
        self.current = self._best_fitting(self.budget_ms)
        self.switches: list[Switch] = []
        self._recent: deque[float] = deque(maxlen=window)
        self._calls = 0

    def _best_fitting(self, limit_ms: float) -> Candidate:
        fitting = [p for p in self.profiles if self.expected_ms[p.name] <= limit_ms]
        return fitting[0] if fitting else min(self.profiles, key=lambda p: self.expected_ms[p.name])

    def observe(self, latency_ms: float) -> Candidate:
        """Record one call's latency under the current profile; returns the profile for the next call."""
        self._calls += 1
        self._recent.append(latency_ms)
        if len(self._recent) < self.window:
            return self.current
        measured = float(np.percentile(self._recent, 95))
        self.expected_ms[self.current.name] = measured
        if measured > self.budget_ms * (1 + self.hysteresis):
            # The current profile's expectation is now its measured p95, so it no longer "fits".
            choice = self._best_fitting(self.budget_ms)
            reason = f"p95 {measured:.1f} ms over budget {self.budget_ms:.1f} ms"
        elif measured < self.budget_ms * (1 - self.hysteresis):
            choice = self._best_fitting(self.budget_ms)
            if choice.fidelity <= self.current.fidelity:
                return self.current
            reason = f"p95 {measured:.1f} ms leaves room under budget {self.budget_ms:.1f} ms"
        else:
            return self.current
        if choice.name != self.current.name:
            self.switches.append(Switch(self._calls, self.current.name, choice.name, reason))
            self.current = choice
            self._recent.clear()
        return self.current
