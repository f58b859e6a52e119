"""Forecasting a quantity of the denoising loop (a branch's output, the step's velocity) at a step where it is
not computed, from the steps where it was: Lagrange extrapolation through the last `order + 1` computed
values (order 0: the last value as it is; 1: the line through the last two; 2: the parabola through the last
three), uneven spacing allowed. TaylorSeer's finite-difference Taylor series and Adams-Bashforth-style
extrapolation of cached features are this polynomial written another way.
"""

from __future__ import annotations

import torch


def extrapolate(history: list[tuple[int, torch.Tensor]], step: int) -> torch.Tensor:
    """The polynomial through every (step, value) of `history` evaluated at `step`."""
    if len(history) == 1:
        return history[0][1]
    result = None
    for i, (step_i, value) in enumerate(history):
        weight = 1.0
        for j, (step_j, _) in enumerate(history):
            if j != i:
                weight *= (step - step_j) / (step_i - step_j)
        result = value * weight if result is None else result + value * weight
    return result


def relative_error(forecast: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    """||forecast - actual|| / ||actual||, a 0-d tensor (read it where a graph break does not matter)."""
    return (forecast - actual).norm() / actual.norm().clamp_min(1e-12)


class History:
    """The last `order + 1` computed (step, value) pairs of one quantity within one inference; `error`: how far
    the forecast from the values before the last computed step was from it (None until there were enough)."""

    def __init__(self, order: int):
        self.order = order
        self.points: list[tuple[int, torch.Tensor]] = []
        self.error: torch.Tensor | None = None

    def forecast(self, step: int) -> torch.Tensor:
        return extrapolate(self.points, step)

    def record(self, step: int, value: torch.Tensor, measure: bool = False) -> None:
        """`measure`: also measure the forecast's error at `step` (only once there are `order + 1` points)."""
        if self.points and (step <= self.points[-1][0] or self.points[-1][1].shape != value.shape):
            self.points = []  # a new inference (or batch): nothing carries over
            self.error = None
        if measure and len(self.points) > self.order:
            self.error = relative_error(self.forecast(step), value)
        self.points = [*self.points[-self.order:], (step, value)] if self.order else [(step, value)]

    def clear(self) -> None:
        self.points = []
        self.error = None
