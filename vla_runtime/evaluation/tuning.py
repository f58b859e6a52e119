"""vla-tune's search: which acceleration methods, with which settings, make a policy meet a speed goal while moving
its actions least, and what that costs in closed-loop success.

Stage 1 (open loop, cheap): optuna's multi-objective TPE sampler proposes profiles from the methods' declared search
spaces (`AccelMethod.search`); each is measured against `none` in one run (`speed.measure`: latency interleaved,
actions on the same observations with the same noise), which gives its speedup and its action deviation (MSE over
the variance of `none`'s actions); the goal is a constraint. Stage 2 (closed loop): candidates spread along the
front of those that meet the goal run the same episodes as `none` on the development seeds, compared paired. Both
stages resume: the study lives in an sqlite file and each closed-loop run in an episode journal.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vla_runtime.accel.method import METHODS, Suggest, methods_in_order
from vla_runtime.accel.profiles import Accelerator, Profile, compatible_methods
from vla_runtime.evaluation.speed import Entry, action_head, measure, summarize_runs
from vla_runtime.execution import ExecConfig
from vla_runtime.types import Observation

STUDY = "vla-tune"


@dataclass(frozen=True)
class Goal:
    """What the tuned profile must reach (one of the two).

    Attributes:
        budget_ms: its p50 latency per inference on this machine, at the measured thread count.
        min_speedup: its p50 speedup against `none`, measured interleaved in the same run.
    """

    budget_ms: float | None = None
    min_speedup: float | None = None

    def __post_init__(self) -> None:
        given = [value for value in (self.budget_ms, self.min_speedup) if value is not None]
        if len(given) != 1 or not given[0] > 0:
            raise ValueError(f"Give one goal, budget_ms=<ms> or min_speedup=<x>, positive; got budget_ms="
                             f"{self.budget_ms}, min_speedup={self.min_speedup}")

    def shortfall(self, latency_ms: float, speedup: float) -> float:
        """How far a candidate is from the goal, relative (<= 0: it meets it)."""
        if self.budget_ms is not None:
            return latency_ms / self.budget_ms - 1
        return 1 - speedup / self.min_speedup

    def __str__(self) -> str:
        return f"p50 <= {self.budget_ms:g} ms" if self.budget_ms is not None else f"speedup >= {self.min_speedup:g}x"


@dataclass(frozen=True)
class Candidate:
    """One measured trial of stage 1.

    Attributes:
        trial: the optuna trial number (its name in the report: `trial<N>`).
        methods: the profile's methods and settings, as a profile file holds them.
        speedup: p50 latency of `none` over the candidate's, interleaved in one run.
        latency_ms: the candidate's p50 latency per inference.
        action_deviation: MSE of its actions against `none`'s over the variance of `none`'s.
        flops_ratio: FLOPs per inference relative to `none`.
        shortfall: `Goal.shortfall` (<= 0: meets the goal).
    """

    trial: int
    methods: dict[str, dict]
    speedup: float
    latency_ms: float
    action_deviation: float
    flops_ratio: float
    shortfall: float

    @property
    def name(self) -> str:
        return f"trial{self.trial}"

    @property
    def meets_goal(self) -> bool:
        return self.shortfall <= 0

    def profile(self) -> Profile:
        return Profile(self.name, {method: dict(settings) for method, settings in self.methods.items()},
                       description=f"vla-tune trial {self.trial}: {self.speedup:.2f}x, action deviation "
                                   f"{self.action_deviation:.4f}")


class _Named:
    """A method's view of a trial: its settings' names prefixed with the method's (`head_cache.mode`)."""

    def __init__(self, trial: Any, method: str):
        self.trial, self.method = trial, method

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return self.trial.suggest_categorical(f"{self.method}.{name}", list(choices))

    def suggest_int(self, name: str, low: int, high: int, step: int = 1) -> int:
        return self.trial.suggest_int(f"{self.method}.{name}", low, high, step=step)

    def suggest_float(self, name: str, low: float, high: float) -> float:
        return self.trial.suggest_float(f"{self.method}.{name}", low, high)


class _FirstChoice:
    """A proposal from a search space without a study: the first choice, the low end of each range."""

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return choices[0]

    def suggest_int(self, name: str, low: int, high: int, step: int = 1) -> int:
        return low

    def suggest_float(self, name: str, low: float, high: float) -> float:
        return low


def searchable(accelerator: Accelerator) -> list[str]:
    """The methods with a search space that can run on the policy (as their space proposes them: a policy may take
    a method only with some settings), in the order profiles apply them."""
    structure, names = accelerator.policy.structure, []
    for method in methods_in_order():
        if method.search is None or structure.missing(method.requires):
            continue  # its space reads the hook points it needs
        try:
            proposal = method.search(_FirstChoice(), structure)
            accelerator.check(Profile(method.name, {method.name: proposal}))
        except ValueError:
            continue
        names.append(method.name)
    return names


def propose(trial: Suggest, accelerator: Accelerator, methods: list[str]) -> dict[str, dict]:
    """A profile's methods for this trial: each searchable method on or off, its settings from its space; what cannot
    go together with the methods before it is left out (so the profile holds only what runs)."""
    structure = accelerator.policy.structure
    chosen = {name: METHODS.get(name).search(_Named(trial, name), structure)
              for name in methods if trial.suggest_categorical(name, [False, True])}
    kept = compatible_methods(accelerator.policy, Profile("trial", chosen, skip_incompatible=True),
                              accelerator.policy_name)
    return {method.name: chosen[method.name] for method in kept}


def measure_profiles(accelerator: Accelerator, profiles: list[Profile], sequences: list[list[Observation]],
                     rounds: int, execution: ExecConfig, progress: bool = False) -> dict[str, dict]:
    """`none` and `profiles` on `execution`, measured in one run, interleaved: their rows of vla-bench's table."""
    rows = [Entry("none", Profile("none"), ExecConfig()), *(Entry(p.name, p, execution) for p in profiles)]
    runs = measure(accelerator, rows, sequences, rounds, progress)
    return summarize_runs(runs, action_head(accelerator.policy) is not None)


def search(study: Any, accelerator: Accelerator, sequences: list[list[Observation]], goal: Goal, trials: int,
           rounds: int, execution: ExecConfig, on_trial: Callable[[Candidate], None] = lambda c: None) -> None:
    """Runs stage 1 until `study` holds `trials` finished trials (a resumed study runs only the rest). The empty
    profile is enqueued first, so the front always has the no-change end."""
    import optuna

    methods = searchable(accelerator)
    if not methods:
        raise ValueError(f"No searchable acceleration method fits {accelerator.policy_name} "
                         f"(methods with a search space: {[m.name for m in methods_in_order() if m.search]})")
    state = optuna.trial.TrialState
    finished = [t for t in study.trials if t.state == state.COMPLETE]
    empty = {name: False for name in methods}
    if not any(t.params == empty for t in study.trials if t.state in (state.COMPLETE, state.WAITING)):
        study.enqueue_trial(empty)

    def objective(trial) -> tuple[float, float]:
        chosen = propose(trial, accelerator, methods)
        row = measure_profiles(accelerator, [Profile("candidate", chosen)], sequences, rounds, execution)["candidate"]
        candidate = Candidate(trial.number, chosen, row["speedup"], row["latency_ms_p50"],
                              row["action_mse_rel_variance"] or 0.0, row["flops_ratio"],
                              goal.shortfall(row["latency_ms_p50"], row["speedup"]))
        for key, value in vars(candidate).items():
            trial.set_user_attr(key, value)
        trial.set_constraint("goal", candidate.shortfall)  # <= 0: feasible
        on_trial(candidate)
        return candidate.action_deviation, candidate.speedup

    if trials > len(finished):  # a proposal that cannot be applied fails its trial (logged), not the search
        study.optimize(objective, n_trials=trials - len(finished), catch=(ValueError,))


def candidates(study: Any) -> list[Candidate]:
    """Every finished trial of the study, as measured."""
    import optuna

    return [Candidate(**{key: t.user_attrs[key] for key in Candidate.__dataclass_fields__})
            for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def pareto_front(found: list[Candidate]) -> list[Candidate]:
    """The candidates no other beats on both speedup and action deviation, fastest last."""
    front = [c for c in found if not any(o.speedup >= c.speedup and o.action_deviation <= c.action_deviation
                                         and (o.speedup, o.action_deviation) != (c.speedup, c.action_deviation)
                                         for o in found)]
    unique = {(c.speedup, c.action_deviation): c for c in sorted(front, key=lambda c: -c.trial)}
    return sorted(unique.values(), key=lambda c: (c.speedup, c.trial))


def finalists(found: list[Candidate], count: int, max_deviation: float) -> list[Candidate]:
    """Stage 2's candidates. Among those that meet the goal (with methods) and move actions by at most
    `max_deviation`: `count` spread evenly along their Pareto front from its most faithful to its fastest end, so
    the closed loop can pick a profile faster than the goal. Without such a candidate: the most faithful that meet the
    goal; without one of those, the closest to it."""
    meeting = [c for c in found if c.meets_goal and c.methods]
    front = [c for c in pareto_front(meeting) if c.action_deviation <= max_deviation]
    if front:
        spread = [round(i * (len(front) - 1) / (count - 1)) for i in range(count)] if count > 1 else [0]
        return [front[index] for index in dict.fromkeys(spread)]
    if meeting:  # a sampler proposes some profiles twice: each runs in closed loop once
        by_profile: dict[str, Candidate] = {}
        for candidate in sorted(meeting, key=lambda c: (c.action_deviation, c.trial)):
            by_profile.setdefault(json.dumps(candidate.methods, sort_keys=True), candidate)
        return list(by_profile.values())[:count]
    closest = min((c for c in found if c.methods), key=lambda c: (c.shortfall, c.trial), default=None)
    return [closest] if closest is not None and math.isfinite(closest.shortfall) else []
