"""What an acceleration method is, to profiles and benchmarks: one descriptor per method module.

A method is one module that defines a config dataclass and `apply(policy, config, artifact) -> Handle`,
written against the hook points of `PolicyStructure` only, and registers its descriptor:

    METHOD = register_method(AccelMethod("my_method", MyConfig, apply, requires=("language_model",),
                                         phase=Phase.TOKENS))

Modules are found through the `vla_runtime.accel_methods` entry point group (`vla_runtime.plugins`), so a
method from another package is one module plus one entry point.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Any, Protocol

from vla_runtime.hooks import Handle
from vla_runtime.plugins import Registry
from vla_runtime.types import Observation, Policy, PolicyStructure


def _never(config: Any) -> bool:
    return False


class Suggest(Protocol):
    """What a method's search space asks of a tuner for each setting (optuna's `Trial` is one; vla-tune prefixes
    the names with the method's)."""

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...

    def suggest_int(self, name: str, low: int, high: int, step: int = 1) -> int: ...

    def suggest_float(self, name: str, low: float, high: float) -> float: ...


class Phase(IntEnum):
    """Where a method acts on a policy, in the order a profile's methods are applied (each sees the policy as the
    phases before it left it; within a phase, by name)."""

    WEIGHTS = 0  # what the weights are (quantize)
    INPUTS = 1  # what enters the vision encoder (vision_resolution)
    LAYERS = 2  # which layers the model has (layer_prune)
    TOKENS = 3  # which tokens flow through the language model (token_select)
    LM_CACHE = 4  # what the language model reuses from the last frame (visual_kv_reuse)
    HEAD = 5  # the action head's denoising steps (head_cache, step_reduction)
    DECODING = 6  # how action tokens are decoded (parallel_decode)
    CALLS = 7  # whether the policy is called at all (action_reuse's gate)


@dataclass(frozen=True)
class AccelMethod:
    name: str
    config: type  # a dataclass; its fields are the method's settings in profiles
    apply: Callable[[Policy, Any, dict | None], Handle]  # (policy, config, calibration artifact or None)
    requires: tuple[str, ...]  # PolicyStructure hook points it needs
    phase: Phase  # where it acts: a profile's methods are applied phase by phase
    calibrate: Callable[[Policy, list[Observation], Any], dict] | None = None  # -> a json-able artifact
    needs_calibration: Callable[[Any], bool] = _never  # whether `config` needs an artifact
    # A hook point whose presence rules the method out, with the reason.
    excluded_by: tuple[str, str] | None = None
    # (structure, config) -> why the method cannot run so on it (None: it can), what `requires` cannot say
    unsupported: Callable[[Any, Any], str | None] | None = None
    # Methods it cannot share a policy with -> why (checked both ways).
    exclusive_with: dict[str, str] = field(default_factory=dict)
    # (suggest, the policy's structure) -> settings for `config`: the space vla-tune searches (None: not searched,
    # e.g. a method whose effect only the closed loop shows)
    search: Callable[[Suggest, PolicyStructure], dict] | None = None
    # config -> the settings that name its calibration artifact (None: all of them); a method leaves out the
    # settings that do not change what the calibration measures, so artifacts outlive new settings
    calibration_settings: Callable[[Any], dict] | None = None

    def calibration_key(self, config: Any) -> dict:
        return self.calibration_settings(config) if self.calibration_settings else asdict(config)

    def make_config(self, settings: dict) -> Any:
        try:
            return self.config(**settings)
        except TypeError as exc:
            raise ValueError(f"accel method {self.name}: {exc} (settings: "
                             f"{', '.join(self.config.__dataclass_fields__)})") from exc


METHODS: Registry[AccelMethod] = Registry("acceleration method", "vla_runtime.accel_methods")


def register_method(method: AccelMethod) -> AccelMethod:
    return METHODS.register(method.name)(method)


def methods_in_order() -> list[AccelMethod]:
    return sorted((method for _, method in METHODS.items()), key=lambda method: (method.phase, method.name))


def exclusion_reason(first: AccelMethod, second: AccelMethod) -> str | None:
    return first.exclusive_with.get(second.name) or second.exclusive_with.get(first.name)
