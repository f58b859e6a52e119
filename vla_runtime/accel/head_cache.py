"""Action-head feature caching across denoising steps.

Each DiT block has an attention and an MLP branch. At a denoising step where a branch is not updated,
its output from the last step where it was is reused (the residual stream and the adaLN modulation
are still computed).

- `static` (EfficientVLA): every branch updates every `interval` steps.
- `bac` (Block-wise Adaptive Caching): calibration records every branch's output at every step and
  builds a step-by-step cosine-similarity matrix per branch; for each branch, dynamic programming
  picks the `updates` steps that maximise the total similarity between each step and the step whose
  output it reuses. Caching errors grow through FFN branches, so the "bubbling union" adds each MLP
  branch's update steps to every branch upstream of it.
Step 0 is always an update step, so nothing leaks from one inference into the next.

Either schedule reuses a cached output as it is (`order: 0`), or forecasts it (`order: 1 | 2`, TaylorSeer /
AB-Cache style, `accel/forecast.py`): the line or parabola through the branch's last two or three computed
outputs, at the step being skipped. With a `tolerance`, a confidence gate: each computed step that could have
been forecast also measures the forecast's relative error there, and when any branch's last error exceeds the
tolerance every branch computes at the next step, whatever its schedule says. The gate is decided on the step
module's own hook, outside a compiled step: a compiled head sees it as one more guard.

When any branch skips a step, the blocks' adaLN modulations for every step are also computed at step 0
in one batched call (`batch_conditioning`): they depend only on the denoising time and the cognition
feature, and reading each adaLN weight matrix once per inference instead of once per step is what a
memory-bound head (ref_dit_large: a third of the head's weight bytes) needs. Equal to the per-step
modulations up to float rounding; a schedule without skips leaves the head untouched (exact baseline).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vla_runtime.accel.forecast import History
from vla_runtime.accel.method import AccelMethod, Phase, Suggest, register_method
from vla_runtime.hooks import Handle, ModelHook, add_hook
from vla_runtime.types import DenoisingHead, Observation, Policy


@dataclass
class HeadCacheConfig:
    """
    Attributes:
        mode: `static` (every branch every `interval` steps) or `bac` (calibrated update steps per branch).
        interval: static: update every `interval` steps (1 = no caching).
        updates: bac: update steps per branch, step 0 included.
        batch_conditioning: the modulations of all steps at step 0 (heads with adaLN modulations only).
        order: what a skipped step gets: 0 = the last computed output as it is, 1 / 2 = forecast from the last
            two / three computed outputs.
        tolerance: the confidence gate (order >= 1): every branch computes at the step after a forecast's
            relative error on a computed step exceeded it (None: no gate).
    """

    mode: str = "static"
    interval: int = 2
    updates: int = 4
    batch_conditioning: bool = True
    order: int = 0
    tolerance: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("static", "bac"):
            raise ValueError(f"head_cache mode must be 'static' or 'bac', got '{self.mode}'")
        if self.interval < 1 or self.updates < 1:
            raise ValueError("head_cache interval and updates must be >= 1")
        if self.order not in (0, 1, 2):
            raise ValueError(f"head_cache order must be 0, 1 or 2, got {self.order}")
        if self.tolerance is not None and (self.order == 0 or not self.tolerance > 0):
            raise ValueError("head_cache tolerance gates a forecast: it needs order >= 1 and a value > 0")


class _StepCounter(ModelHook):
    """On the head: which denoising step is running (t = step / steps in the Euler loop); with
    `blocks`, also every block's adaLN output for every step, computed at step 0."""

    def __init__(self, head: DenoisingHead, batched: bool = False, tolerance: float | None = None):
        self.head = head
        self.steps = head.steps
        self.step = 0
        self.batched = batched
        self.tolerance = tolerance
        self.branches: list[_CachedBranch] = []
        self.trusted = True  # the gate: whether the branches' forecasts may stand in for this step
        self.forced: Counter[int] = Counter()  # calls the gate made compute at a step their schedule skips
        self.modulations: list[torch.Tensor] | None = None  # per block [steps, batch, 6 * dim]
        # Calls per step, for the statistics. Counted here, outside the head's forward: a compiled head would
        # specialise (and recompile) on a counter its branches incremented.
        self.calls: Counter[int] = Counter()

    def pre_forward(self, module, *args, **kwargs):
        self.step = self.head.step_of(args, kwargs, self.step)
        self.calls[self.step] += 1
        if self.tolerance is not None:
            self.trusted = self.step <= 0 or all(
                branch.history.error is None or float(branch.history.error) <= self.tolerance
                for branch in self.branches)
            if not self.trusted:
                self.forced[self.step] += 1
        if self.batched and self.step == 0:
            noisy, t, cognition = args
            batch = cognition.shape[0]
            # The same float times the Euler loop builds with torch.full(step / steps).
            times = torch.tensor([s / self.steps for s in range(self.steps)], device=cognition.device)
            conditions = self.head.condition(times.repeat_interleave(batch), cognition.repeat(self.steps, 1))
            self.modulations = [block.modulation(conditions).view(self.steps, batch, -1) for block in self.head.blocks]
        return args, kwargs

    def reset_state(self, module) -> None:
        self.modulations = None


class _BatchedModulation(ModelHook):
    """On a block's adaLN: this step's row of what the counter computed at step 0."""

    def __init__(self, counter: _StepCounter, index: int):
        self.counter = counter
        self.index = index

    def new_forward(self, module, call_next, condition):
        modulations = self.counter.modulations
        if modulations is None or modulations[self.index].shape[1] != condition.shape[0]:
            return call_next(condition)
        return modulations[self.index][self.counter.step]


class _CachedBranch(ModelHook):
    def __init__(self, counter: _StepCounter, update_steps: set[int], order: int):
        self.counter = counter
        self.update_steps = update_steps | {0}
        self.history = History(order)
        self.measure = counter.tolerance is not None

    def new_forward(self, module, call_next, *args, **kwargs):
        step, points = self.counter.step, self.history.points
        if (step in self.update_steps or not self.counter.trusted or not points
                or points[-1][1].shape[0] != args[0].shape[0]):
            output = call_next(*args, **kwargs)
            self.history.record(step, output, self.measure)
            return output
        return self.history.forecast(step)

    @property
    def computed(self) -> int:
        """Calls that computed this branch since it was applied (by its schedule, step 0 always updating, and
        the gate's forced steps)."""
        return sum(calls if step in self.update_steps else self.counter.forced[step]
                   for step, calls in self.counter.calls.items() if step >= 0)

    @property
    def reused(self) -> int:
        return sum(calls for step, calls in self.counter.calls.items() if step >= 0) - self.computed

    def reset_state(self, module) -> None:
        self.history.clear()


def _branches(policy: Policy) -> tuple[DenoisingHead, list[tuple[str, nn.Module]]]:
    """The head and its branches as ("<block>.<branch>", module), in execution order."""
    head = policy.structure.require("denoising_head", "head_cache")
    return head, [(f"{index}.{kind}", module) for index, block in enumerate(head.blocks)
                  for kind, module in block.branches.items()]


def calibrate(policy: Policy, observations: list[Observation]) -> dict:
    """Per branch, the mean cosine similarity between its outputs at every pair of denoising steps."""
    if not observations:
        raise ValueError("head_cache calibration needs at least one observation")
    head, branches = _branches(policy)
    steps = head.steps
    counter = _StepCounter(head)
    outputs: dict[str, list[list[torch.Tensor]]] = {name: [] for name, _ in branches}

    class Recorder(ModelHook):
        def __init__(self, name: str):
            self.name = name

        def post_forward(self, module, output):
            if counter.step == 0:
                outputs[self.name].append([])
            outputs[self.name][-1].append(output.detach().flatten(1).clone())
            return output

    removers = [add_hook(head.step, "head_cache_counter", counter)]
    removers += [add_hook(module, "head_cache_recorder", Recorder(name)) for name, module in branches]
    try:
        for obs in observations:
            policy.reset()
            policy.predict_chunk(obs)
    finally:
        for remove in reversed(removers):
            remove()
    similarity = {}
    for name, runs in outputs.items():
        per_run = []
        for run in runs:
            features = torch.stack(run)  # [steps, batch, features]
            per_run.append(F.cosine_similarity(features[:, None], features[None, :], dim=-1).mean(-1))
        similarity[name] = torch.stack(per_run).mean(0).tolist()
    return {"method": "head_cache", "steps": steps, "similarity": similarity}


def choose_update_steps(similarity: np.ndarray, updates: int) -> list[int]:
    """Dynamic programming: update steps u_0 = 0 < u_1 < ... maximising sum_s similarity[s, u(s)],
    u(s) being the last update step at or before s."""
    steps = len(similarity)
    updates = min(updates, steps)
    # segment[a][b]: total similarity of steps a..b-1 reusing step a
    cumulative = np.zeros((steps, steps + 1))
    for a in range(steps):
        cumulative[a, a + 1:] = np.cumsum(similarity[a:, a])
    best = np.full((updates + 1, steps + 1), -np.inf)
    choice = np.zeros((updates + 1, steps + 1), dtype=int)
    # best[k][b]: best total for steps 0..b-1 with k update steps, the last segment ending at b
    for b in range(1, steps + 1):
        best[1][b] = cumulative[0, b]
    for k in range(2, updates + 1):
        for b in range(k, steps + 1):
            for a in range(k - 1, b):
                value = best[k - 1][a] + cumulative[a, b]
                if value > best[k][b]:
                    best[k][b], choice[k][b] = value, a
    chosen, b = [], steps
    for k in range(updates, 1, -1):
        b = int(choice[k][b])  # Python ints: a compiled head specialises on them
        chosen.append(b)
    return sorted([0, *chosen])


def bac_schedule(calibration: dict, updates: int) -> dict[str, set[int]]:
    if calibration.get("method") != "head_cache":
        raise ValueError(f"Not a head_cache calibration artifact: method {calibration.get('method')!r}")
    names = list(calibration["similarity"])
    schedule = {name: set(choose_update_steps(np.asarray(calibration["similarity"][name]), updates))
                for name in names}
    # Bubbling union: what an MLP branch recomputes, every branch feeding it recomputes too.
    for position, name in enumerate(names):
        if name.endswith(".mlp"):
            for upstream in names[:position]:
                schedule[upstream] |= schedule[name]
    return schedule


def apply(policy: Policy, config: HeadCacheConfig, calibration: dict | None = None) -> Handle:
    head, branches = _branches(policy)
    steps = head.steps
    if config.mode == "static":
        schedule = {name: {s for s in range(steps) if s % config.interval == 0} for name, _ in branches}
    else:
        if calibration is None:
            raise ValueError("head_cache mode=bac needs a calibration artifact (head_cache.calibrate)")
        if calibration["steps"] != steps:
            raise ValueError(f"Calibrated for {calibration['steps']} denoising steps, the head runs {steps}")
        schedule = bac_schedule(calibration, config.updates)
    skips = any(len(schedule[name] | {0}) < steps for name, _ in branches)
    # Batching needs adaLN modulations computed from (t, cognition); a head without them (SmolVLA's expert
    # takes the time in its input tokens) caches its branches all the same.
    modulated = head.condition is not None and all(block.modulation is not None for block in head.blocks)
    batched = config.batch_conditioning and skips and modulated
    counter = _StepCounter(head, batched, config.tolerance)
    hooks = {name: _CachedBranch(counter, schedule[name], config.order) for name, _ in branches}
    counter.branches = list(hooks.values())
    removers = [add_hook(head.step, "head_cache_counter", counter)]
    removers += [add_hook(module, "head_cache", hooks[name]) for name, module in branches]
    if batched:
        removers += [add_hook(block.modulation, "head_cache_adaln", _BatchedModulation(counter, index))
                     for index, block in enumerate(head.blocks)]
    return Handle("head_cache", removers, info={"schedule": {k: sorted(v) for k, v in schedule.items()},
                                                 "branches": hooks}, stats=lambda: _stats(list(hooks.values())))


def _stats(branches: list[_CachedBranch]) -> dict:
    computed, reused = sum(b.computed for b in branches), sum(b.reused for b in branches)
    return {"branch_updates_share": computed / max(1, computed + reused)}


def _search(suggest: Suggest, structure) -> dict:
    """Static intervals of 2-4 steps, or BAC with 2 to all-but-one update steps per branch; either reusing or
    forecasting (order 0-2), a forecast gated or not."""
    if suggest.suggest_categorical("mode", ["static", "bac"]) == "static":
        settings = {"mode": "static", "interval": suggest.suggest_int("interval", 2, 4)}
    else:
        steps = structure.denoising_head.steps
        settings = {"mode": "bac", "updates": suggest.suggest_int("updates", 2, max(2, steps - 1))}
    order = suggest.suggest_int("order", 0, 2)
    tolerance = suggest.suggest_categorical("tolerance", [None, 0.05, 0.1, 0.2]) if order else None
    return {**settings, "order": order, "tolerance": tolerance}


METHOD = register_method(AccelMethod(
    "head_cache", HeadCacheConfig, apply, requires=("denoising_head",), phase=Phase.HEAD,
    calibrate=lambda policy, observations, config: calibrate(policy, observations),
    needs_calibration=lambda config: config.mode == "bac", search=_search,
    # Forecasting changes what a skipped step gets, not what the calibration measures.
    calibration_settings=lambda config: {name: getattr(config, name)
                                         for name in ("mode", "interval", "updates", "batch_conditioning")}))
