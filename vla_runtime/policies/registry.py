"""Name -> policy factory, and name -> trainer. A policy family is a module that registers its factories (and, if
it trains, its trainer: what `vla-train trainer=<name>` runs) when imported, found through the
`vla_runtime.policies` entry point group (see `vla_runtime.plugins`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from vla_runtime.plugins import Registry
from vla_runtime.types import Policy


@dataclass(frozen=True)
class PolicyFactory:
    build: Callable[..., Policy]
    # The factory takes the simulator suite as its first argument (a suite's expert, a random policy or
    # random weights shaped for the suite's robot); the others are built from their own checkpoints.
    needs_suite: bool = False


POLICIES: Registry[PolicyFactory] = Registry("policy", "vla_runtime.policies")
# (settings: configs/train.yaml without `model` and `trainer`, model options: `model=`) -> the checkpoint directory
Trainer = Callable[[dict, dict], Path]
TRAINERS: Registry[Trainer] = Registry("trainer", "vla_runtime.policies")


def register_trainer(name: str) -> Callable[[Trainer], Trainer]:
    return TRAINERS.register(name)


def register_policy(name: str, needs_suite: bool = False) -> Callable[[Callable[..., Policy]], Callable[..., Policy]]:
    def decorator(build: Callable[..., Policy]) -> Callable[..., Policy]:
        POLICIES.register(name)(PolicyFactory(build, needs_suite))
        return build

    return decorator


def shipped_checkpoint(name: str) -> Path:
    """checkpoints/<name> of the repository, installed as the package data vla_runtime.checkpoints."""
    return Path(str(resources.files("vla_runtime.checkpoints") / name))


def policy_names() -> list[str]:
    return POLICIES.names()


def make_policy(name: str, suite: Any = None, **options: Any) -> Policy:
    """Builds the policy registered as `name`. `suite`: the simulator suite it will run in, for the
    policies that are built from one (required by those, ignored by the others)."""
    factory = POLICIES.get(name)
    if not factory.needs_suite:
        return factory.build(**options)
    if suite is None:
        raise ValueError(f"Policy '{name}' is built from a simulator suite; none was given")
    return factory.build(suite, **options)
