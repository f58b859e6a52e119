"""Fewer denoising steps: at chosen steps the action head is not called, and its output is forecast from the
steps where it was (`accel/forecast.py`).

- `schedule`: the head runs `steps` evenly spaced steps of its loop (step 0 always), and every step between
  reuses the last output as it is. For a flow-matching head stepped x <- x + v / steps this is exactly an Euler
  loop of `steps` steps on the same time grid (a reused velocity is one longer Euler step): the simple baseline.
- `extrapolate` (FSampler): the output of a skipped step is extrapolated from the last `order + 1` real ones.
  A step is skipped only when there are enough real ones before it, the last `last_real` steps are always real,
  at most `max_skips` steps in a row are skipped, and with a `tolerance` only while the extrapolation was
  within it of the last real step's output (the confidence gate: measured on every real step that had enough
  real ones before it).

The hook sits outermost on the head's step module, outside a compiled step: a skipped step calls nothing
beneath it (a head cache's step counter included). Works on a head whose step returns one tensor (a velocity,
a DDPM / DDIM epsilon); a head whose step module also runs the prefix (SmolVLA's, pi0's VLM-with-expert) is
refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vla_runtime.accel.forecast import History
from vla_runtime.accel.method import AccelMethod, Phase, Suggest, register_method
from vla_runtime.hooks import Handle, ModelHook, add_hook
from vla_runtime.types import DenoisingHead, Policy, PolicyStructure

MODES = ("schedule", "extrapolate")


@dataclass
class StepReductionConfig:
    """
    Attributes:
        mode: `schedule` (a fixed, shorter loop) or `extrapolate` (FSampler-style forecasting of skipped steps).
        steps: schedule: how many of the head's steps run, evenly spaced from step 0.
        order: extrapolate: 1 = linear through the last two real outputs, 2 = quadratic through the last three.
        max_skips: extrapolate: most steps skipped in a row.
        last_real: extrapolate: how many of the final steps always run.
        tolerance: extrapolate: skip only while the extrapolation's relative error on the last real step that
            could be checked is at most this (None: no gate).
    """

    mode: str = "schedule"
    steps: int = 5
    order: int = 1
    max_skips: int = 1
    last_real: int = 1
    tolerance: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"step_reduction mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if self.steps < 1 or self.max_skips < 1 or self.last_real < 0:
            raise ValueError("step_reduction needs steps >= 1, max_skips >= 1 and last_real >= 0")
        if self.order not in (1, 2):
            raise ValueError(f"step_reduction order must be 1 or 2, got {self.order}")
        if self.tolerance is not None and not self.tolerance > 0:
            raise ValueError(f"step_reduction tolerance must be > 0 (or null for no gate), got {self.tolerance}")


class _Skipper(ModelHook):
    calls_through = True  # a real step is the step module's own forward, compiled whole

    def __init__(self, head: DenoisingHead, config: StepReductionConfig):
        self.head = head
        self.config = config
        self.extrapolating = config.mode == "extrapolate"
        # schedule: the steps that run
        self.real_steps = {round(i * head.steps / config.steps) for i in range(min(config.steps, head.steps))}
        self.history = History(config.order if self.extrapolating else 0)
        self.step = -1
        self.in_row = 0
        self.computed = 0
        self.skipped = 0

    def _skip(self, step: int) -> bool:
        if not self.extrapolating:
            return step not in self.real_steps
        config = self.config
        if (step == 0 or len(self.history.points) <= config.order or step >= self.head.steps - config.last_real
                or self.in_row >= config.max_skips):
            return False
        error = self.history.error
        return config.tolerance is None or (error is not None and float(error) <= config.tolerance)

    def new_forward(self, module, call_next, *args, **kwargs):
        self.step = step = self.head.step_of(args, kwargs, self.step)
        if step < 0:
            return call_next(*args, **kwargs)
        if step == 0:
            self.history.clear()
            self.in_row = 0
        if self._skip(step):
            self.in_row += 1
            self.skipped += 1
            return self.history.forecast(step)
        output = call_next(*args, **kwargs)
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"step_reduction forecasts a head step that returns one tensor; this one returns "
                            f"{type(output).__name__}")
        self.history.record(step, output, measure=self.config.tolerance is not None)
        self.in_row = 0
        self.computed += 1
        return output

    def reset_state(self, module) -> None:
        self.history.clear()
        self.step = -1


def _unsupported(structure: PolicyStructure, config: StepReductionConfig) -> str | None:
    if structure.denoising_head.is_prefix is not None:
        return ("its denoising step module also runs the prefix and returns more than the step's output "
                "(a VLM-with-expert), which step_reduction cannot forecast")
    return None


def apply(policy: Policy, config: StepReductionConfig, calibration: dict | None = None) -> Handle:
    head = policy.structure.require("denoising_head", "step_reduction")
    why = _unsupported(policy.structure, config)
    if why:
        raise ValueError(f"step_reduction cannot run on this policy: {why}")
    skipper = _Skipper(head, config)
    remove = add_hook(head.step, "step_reduction", skipper, outermost=True)
    return Handle("step_reduction", [remove], info={"skipper": skipper},
                  stats=lambda: {"real_steps_share": skipper.computed / max(1, skipper.computed + skipper.skipped)})


def _search(suggest: Suggest, structure: PolicyStructure) -> dict:
    """A fixed loop of 2 to all-but-one steps, or extrapolation of order 1-2 with 1-3 skips in a row, gated or
    not."""
    steps = structure.denoising_head.steps
    if suggest.suggest_categorical("mode", list(MODES)) == "schedule":
        return {"mode": "schedule", "steps": suggest.suggest_int("steps", 2, max(2, steps - 1))}
    return {"mode": "extrapolate", "order": suggest.suggest_int("order", 1, 2),
            "max_skips": suggest.suggest_int("max_skips", 1, 3),
            "tolerance": suggest.suggest_categorical("tolerance", [None, 0.05, 0.1, 0.2])}


METHOD = register_method(AccelMethod(
    "step_reduction", StepReductionConfig, apply, requires=("denoising_head",), phase=Phase.HEAD,
    unsupported=_unsupported, search=_search))
