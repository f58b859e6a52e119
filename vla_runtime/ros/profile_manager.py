"""The control node's acceleration: one profile at a time on its policy, or, with a latency budget and a
ladder of profiles, the budget governor's choice among them."""

from __future__ import annotations

from collections.abc import Callable

from vla_runtime.accel.profiles import Accelerator, ProfileHandle, ladder, load_profiles
from vla_runtime.control.governor import BudgetGovernor, Candidate
from vla_runtime.control.reuse import NeverReuse, ReuseGate
from vla_runtime.execution import ExecConfig
from vla_runtime.types import Observation, Policy


class ProfileManager:
    """`calibration`: the calibration observations (a suite's expert episodes), or None where the node has no
    suite. Then every profile it may use is applied at startup, so one that needs calibrating, for which the
    checkpoint ships no artifact, is an error before the loop starts instead of in a control tick."""

    def __init__(self, policy: Policy, policy_name: str, accel: str, accel_ladder: list[str], budget_ms: float,
                 calibration: Callable[[], list[Observation]] | None, execution: ExecConfig | None = None,
                 calibration_dir: str | None = None):
        if accel_ladder and budget_ms <= 0:
            raise ValueError("accel_ladder needs budget_ms > 0 (the governor picks from the ladder by the budget)")
        self.accelerator = Accelerator(policy, calibration or self._no_calibration, calibration_dir or None,
                                       policy_name=policy_name, execution=execution)
        steps = ladder(accel_ladder)
        # No latency priors: every profile "fits" until measured, so the governor starts with the most
        # faithful (the first) and steps down the ladder only while measured p95 exceeds the budget.
        self.governor = BudgetGovernor([Candidate(name, 0.0, -rank) for rank, name in enumerate(steps)],
                                       budget_ms) if steps else None
        self.active = ""
        self._applying = ""
        profiles = steps or [accel]
        self._compiled = execution is not None and execution.backend != "eager"
        if self._compiled or calibration is None:
            # Every profile the node may use, applied now, never first inside a control tick (a compiled one
            # with its graphs built); the first profile last.
            for spec in reversed(profiles):
                self.set(spec)
                if self._compiled:
                    self.accelerator.warm_up()
        else:
            self.set(profiles[0])

    def _no_calibration(self) -> list[Observation]:
        if self._compiled:
            raise ValueError(f"exec={self.accelerator.execution.backend} warms profile '{self._applying}' up on "
                             f"calibration observations and the node has no suite: set suite:=<the suite the policy "
                             f"was trained in> (its expert episodes), or exec:=eager")
        raise ValueError(f"profile '{self._applying}' needs calibration observations and the node has no suite: set "
                         f"suite:=<the suite the policy was trained in> (its expert episodes calibrate it), or ship "
                         f"the checkpoint's calibration artifacts in {self.accelerator.calibration_dir}")

    @property
    def handle(self) -> ProfileHandle | None:
        return self.accelerator.active

    def set(self, spec: str) -> None:
        """Replace the active profile ("a+b" composes). Called between policy calls only."""
        self._applying = spec
        (profile,) = load_profiles(spec.replace(" ", ""), with_baseline=False)
        self.accelerator.remove()
        execution = self.accelerator.execution
        if profile.methods or (execution is not None and not execution.changes_nothing):
            self.accelerator.apply(profile)
        self.active = spec

    def reuse_gate(self) -> ReuseGate:
        handle = self.handle
        gate = handle.reuse_gate if handle is not None and handle.reuse_gate else NeverReuse()
        gate.reset()
        return gate
