"""The control node's robot contract: what the robot takes and gives, which the policy must fit.

The contract is the action limits (their number is the robot's action dimension), the action dimensions
the safe action holds (a gripper), the dimension of the state and the control rate. Each field comes from
the first of these that gives it: the node's parameters, its robot file (`robot_file`: YAML or JSON with
the same field names), the suite's robot (only when the node is given a suite, `suite:=metaworld`), the
policy (its declared rate), the defaults (limits of -1 and 1 in each of the policy's action dimensions,
nothing held, the state not checked). A real robot never inherits a simulator's contract unasked.

The contract is checked against the policy once, at startup: a mismatch is one line naming the field and
where it came from, instead of a rejected message on every tick.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vla_runtime.plugins import did_you_mean
from vla_runtime.types import PolicySpec, RobotSpec

Fields = dict[str, Any]


def _numbers(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise TypeError("a list of numbers")
    return tuple(float(v) for v in value)


def _dims(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise TypeError("a list of integers")
    return tuple(value)


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError("a non-negative integer")
    return value


def _rate(value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise TypeError("a positive number (ticks per second)")
    return float(value)


# field -> its parser for a robot file (raises TypeError saying what the field must be)
FIELDS: dict[str, Callable[[Any], Any]] = {"action_low": _numbers, "action_high": _numbers, "hold_dims": _dims,
                                           "state_dim": _count, "control_hz": _rate}


@dataclass(frozen=True)
class RobotContract:
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
    hold_dims: tuple[int, ...]
    state_dim: int | None  # None: not declared, the policy's is taken as it is
    control_hz: float
    origins: dict[str, str] = field(compare=False)  # field -> where it came from

    @property
    def action_dim(self) -> int:
        return len(self.action_low)

    def _from(self, name: str) -> str:
        return f"{name} (from {self.origins[name]})"

    def __post_init__(self) -> None:
        if len(self.action_low) != len(self.action_high):
            raise ValueError(f"{self._from('action_low')} has {len(self.action_low)} values, "
                             f"{self._from('action_high')} {len(self.action_high)}")
        above = [d for d, (low, high) in enumerate(zip(self.action_low, self.action_high, strict=True)) if low > high]
        if above:
            raise ValueError(f"{self._from('action_low')} exceeds {self._from('action_high')} in dimension(s) {above}")
        if any(not 0 <= d < self.action_dim for d in self.hold_dims):
            raise ValueError(f"{self._from('hold_dims')} {list(self.hold_dims)} is outside the robot's "
                             f"{self.action_dim} action dimensions")
        if self.control_hz <= 0:
            raise ValueError(f"{self._from('control_hz')} must be positive, got {self.control_hz:g}")

    def check(self, spec: PolicySpec, policy: str) -> None:
        """Raises, naming the field and its source, when the policy does not fit this robot."""
        if self.action_dim != spec.action_dim:
            raise ValueError(f"the robot takes {self.action_dim}-D actions ({self._from('action_low')}); policy "
                             f"{policy} outputs {spec.action_dim}-D actions")
        if self.state_dim is not None and self.state_dim != spec.state_dim:
            raise ValueError(f"the robot gives a {self.state_dim}-D state ({self._from('state_dim')}); policy "
                             f"{policy} reads {spec.state_dim}-D states")

    def describe(self) -> str:
        uniform = len(set(self.action_low)) == 1 and len(set(self.action_high)) == 1
        limits = f"[{self.action_low[0]:g}, {self.action_high[0]:g}]" if uniform else \
            f"{list(self.action_low)}..{list(self.action_high)}"
        state = f"{self.state_dim}-D state" if self.state_dim is not None else "state not checked"
        sources = ", ".join(dict.fromkeys(self.origins[name] for name in ("action_low", "action_high")))
        return (f"{self.action_dim}-D actions in {limits} ({sources}), held dims "
                f"{list(self.hold_dims)} ({self.origins['hold_dims']}), {state}, {self.control_hz:g} Hz "
                f"({self.origins['control_hz']})")


def read_robot_file(path: str) -> Fields:
    """The contract fields of a robot file, each checked: a bad one is one line naming the file and the field."""
    where = f"robot_file {path}"
    if not Path(path).is_file():
        raise FileNotFoundError(f"{where}: no such file")
    try:
        content = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{where} is not YAML or JSON: {' '.join(str(exc).split())}") from exc
    if not isinstance(content, dict):
        raise ValueError(f"{where} must be a mapping of {', '.join(FIELDS)}, got {content!r}")
    fields = {}
    for name, value in content.items():
        if name not in FIELDS:
            raise ValueError(f"{where}: unknown field '{name}'{did_you_mean(name, FIELDS)}; fields: "
                             f"{', '.join(FIELDS)}")
        try:
            fields[name] = FIELDS[name](value)
        except TypeError as what:
            raise ValueError(f"{where}: {name} must be {what}, got {value!r}") from None
    return fields


def suite_fields(robot: RobotSpec) -> Fields:
    """The contract a simulator suite's robot gives."""
    limits = {"action_low": robot.action_low, "action_high": robot.action_high} if robot.action_low else {}
    return {**limits, "hold_dims": robot.hold_dims, "state_dim": robot.state_dim, "control_hz": 1.0 / robot.control_dt}


def robot_contract(layers: list[tuple[str, Fields]], spec: PolicySpec, policy: str) -> RobotContract:
    """The contract from `layers` ((source, fields), the first to give a field wins; then the policy's rate and
    the defaults), checked against the policy."""
    rate = {"control_hz": 1.0 / spec.control_dt} if spec.control_dt else {}
    defaults = {"action_low": (-1.0,) * spec.action_dim, "action_high": (1.0,) * spec.action_dim, "hold_dims": (),
                "state_dim": None}
    values, origins = {}, {}
    for source, fields in [*layers, (f"policy {policy}", rate), ("default", defaults)]:
        for name, value in fields.items():
            if name not in values:
                values[name], origins[name] = value, source
    if "control_hz" not in values:
        raise ValueError(f"no control rate: set control_hz (ticks per second), or a robot_file or suite that gives "
                         f"one (policy {policy} declares none)")
    contract = RobotContract(**values, origins=origins)
    contract.check(spec, policy)
    return contract
