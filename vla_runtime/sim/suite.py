"""The simulator-suite seam: what every suite (Meta-World, LIBERO, SIMPLER, ...) provides.

A suite is one sub-package that registers a `Suite` subclass under its name (`@register_suite("name")`)
and is found through the `vla_runtime.suites` entry point group, plus `configs/sim/<name>.yaml` holding
its options (the hydra `sim` group: `sim=<name>`). Everything that runs a simulator (vla-eval,
vla-collect, vla-train, vla-bench, the ROS bridge, calibration) goes through this interface only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from importlib import resources
from typing import Any, Protocol

from vla_runtime.plugins import Registry
from vla_runtime.types import Observation, Policy, RobotSpec


@dataclass(frozen=True)
class SeedRange:
    start: int
    count: int

    @classmethod
    def coerce(cls, value: SeedRange | dict) -> SeedRange:
        """A range as configs give it ({start, count}) or already built."""
        return cls(**value) if isinstance(value, dict) else value

    def seed(self, index: int) -> int:
        if not 0 <= index < self.count:
            raise IndexError(f"Seed index {index} outside range of {self.count} seeds from {self.start}")
        return self.start + index

    def overlaps(self, other: SeedRange) -> bool:
        return self.start < other.start + other.count and other.start < self.start + self.count


class Env(Protocol):
    """One task of a suite. `reset(seed)` gives the same initial state for the same seed; images are
    rendered only when asked (`render`), since rendering costs far more than a physics step."""

    task: str
    instruction: str
    max_steps: int  # the episode is truncated after this many steps
    dt: float  # seconds per step
    render_enabled: bool  # the default of `render` below

    @property
    def measures(self) -> dict[str, bool]:
        """Partial progress of the episode so far, reported beside success (SIMPLER's grasp; empty where
        success is the only measure)."""

    @property
    def steps(self) -> int: ...

    def reset(self, seed: int, render: bool | None = None) -> Observation: ...

    def step(self, action: Any, render: bool | None = None) -> tuple[Observation, float, bool, bool, dict]:
        """-> (observation, reward, success, truncated, info)"""

    def observe(self, render: bool | None = None) -> Observation: ...

    def render(self, camera: str) -> Any:
        """uint8 [H, W, 3]: one configured camera's image of the current state."""

    def close(self) -> None: ...

    def __enter__(self) -> Env: ...

    def __exit__(self, *exc: Any) -> None: ...


class Suite(ABC):
    """Tasks, their environments, seeds, the scripted expert and the robot contract of one simulator.

    Subclasses set `name`, `spec`, `task_sets`, `train_seeds` / `eval_seeds` and implement the abstract
    methods. Their options are the keys of configs/sim/<name>.yaml; every suite takes `cameras` and
    `image_size`. Instances are picklable (worker processes get them).
    """

    name: str
    label: str | None = None  # a caveat printed with every result of the suite (SIMPLER: not the original)
    spec: RobotSpec
    task_sets: dict[str, tuple[str, ...]]  # set name -> tasks ("mt10", "libero_spatial", ...)
    train_seeds: SeedRange
    eval_seeds: SeedRange

    @abstractmethod
    def tasks(self) -> tuple[str, ...]:
        """Every task, in a fixed order (its index is the task id stored with demonstrations)."""

    @abstractmethod
    def resolve_task(self, name: str) -> str:
        """The canonical name of `name`; an unknown task raises ValueError listing the valid ones."""

    @abstractmethod
    def instruction(self, task: str) -> str:
        """The language instruction of `task`."""

    @abstractmethod
    def make_env(self, task: str, render: bool = True, max_steps: int | None = None) -> Env:
        """An environment of `task`; `max_steps` replaces the suite's episode length for it."""

    @abstractmethod
    def expert(self) -> Policy:
        """The scripted expert (reads privileged state): demonstrations and calibration observations."""

    @abstractmethod
    def settings(self) -> dict:
        """What decides how observations look; stored with demonstrations (a resumed collection must match)."""

    # ---- shared by every suite -------------------------------------------------------------------
    @staticmethod
    def options_to_config(config_cls: type, label: str, options: dict[str, Any]) -> Any:
        """`config_cls(**options)`; an unknown option is an error naming the known ones."""
        known = {f.name for f in fields(config_cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"Unknown {label} option(s) {unknown}; known options: {sorted(known)}")
        return config_cls(**options)

    def resolve_tasks(self, tasks: str | list[str] | tuple[str, ...]) -> list[str]:
        """A task-set name, one task, or a list of tasks -> canonical task names."""
        if isinstance(tasks, str):
            if tasks.lower() in self.task_sets:
                return list(self.task_sets[tasks.lower()])
            tasks = [tasks]
        resolved = [self.resolve_task(str(task)) for task in tasks]
        if not resolved:
            raise ValueError(f"Empty task list: name at least one task, or a task set ({', '.join(self.task_sets)})")
        return resolved

    def task_id(self, task: str) -> int:
        return self.tasks().index(self.resolve_task(task))

    def task_for_instruction(self, instruction: str) -> str | None:
        return next((task for task in self.tasks() if self.instruction(task) == instruction), None)

    def seeds(self, split: str) -> SeedRange:
        if split not in ("train", "eval"):
            raise ValueError(f"Unknown seed split '{split}': use 'train' or 'eval'")
        return self.train_seeds if split == "train" else self.eval_seeds

    def check_policy(self, policy: Policy, policy_name: str) -> None:
        """Refuses a policy built for another robot, naming both specs."""
        policy.spec.check_fits(self.spec, policy_name, f"suite '{self.name}'")


SUITES: Registry[type[Suite]] = Registry("simulator suite", "vla_runtime.suites")
register_suite = SUITES.register


def make_suite(name: str, **options: Any) -> Suite:
    """The suite registered as `name`, built with its options (those of configs/sim/<name>.yaml)."""
    return SUITES.get(name)(**options)


def suite_names() -> list[str]:
    return SUITES.names()


def configured_suite(name: str, **overrides: Any) -> tuple[Suite, list[str]]:
    """The suite with the options of the package's configs/sim/<name>.yaml (what the CLIs start from),
    `overrides` on top, and its default tasks; for a suite without a packaged config, its own defaults
    and its first task set. For the ROS nodes, which take no hydra config."""
    import yaml

    path = resources.files("vla_runtime.configs") / "sim" / f"{name}.yaml"
    options = yaml.safe_load(path.read_text()) if path.is_file() else {}
    options.pop("name", None)
    default_tasks = options.pop("default_tasks", None)
    suite = make_suite(name, **{**options, **overrides})
    return suite, suite.resolve_tasks(default_tasks or next(iter(suite.task_sets)))
