"""Name -> policy factory. Policy modules register themselves; `make_policy` imports them lazily."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from vla_runtime.types import Policy

_FACTORIES: dict[str, Callable[..., Policy]] = {}
# Modules that register policies; imported on first lookup so `import vla_runtime` stays light.
_POLICY_MODULES = ("vla_runtime.policies.scripted", "vla_runtime.policies.ref_vla.policy")


def register_policy(name: str) -> Callable[[Callable[..., Policy]], Callable[..., Policy]]:
    def decorator(factory: Callable[..., Policy]) -> Callable[..., Policy]:
        if name in _FACTORIES:
            raise ValueError(f"Policy '{name}' is registered twice")
        _FACTORIES[name] = factory
        return factory

    return decorator


def _load_modules() -> None:
    for module in _POLICY_MODULES:
        importlib.import_module(module)


def policy_names() -> list[str]:
    _load_modules()
    return sorted(_FACTORIES)


def make_policy(name: str, **options: Any) -> Policy:
    _load_modules()
    if name not in _FACTORIES:
        raise ValueError(f"Unknown policy '{name}'. Registered policies: {', '.join(sorted(_FACTORIES))}")
    return _FACTORIES[name](**options)
