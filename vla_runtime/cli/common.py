"""Pieces every CLI shares: config -> objects, and failing with a message instead of a traceback."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vla_runtime.sim.suite import Suite
from vla_runtime.types import Policy


class UsageError(Exception):
    """Bad user input: printed as one line, exit status 2."""


def as_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)


def suite(cfg: DictConfig) -> Suite:
    """The simulator suite of the `sim` config group (`sim.name`, its options); `default_tasks` is the CLI's."""
    from vla_runtime.sim import make_suite

    options = as_dict(cfg.sim)
    options.pop("default_tasks", None)
    return make_suite(options.pop("name"), **options)


def task_list(cfg: DictConfig, sim: Suite) -> list[str]:
    tasks = OmegaConf.to_container(cfg.tasks) if OmegaConf.is_list(cfg.tasks) else cfg.tasks
    return sim.resolve_tasks(tasks)


def policy_spec(cfg: DictConfig) -> tuple[str, dict[str, Any]]:
    """(registered policy name, its options) from the `policy` config group."""
    from vla_runtime.policies import policy_names

    options = as_dict(cfg.policy)
    name = options.pop("name")
    if name not in policy_names():
        raise UsageError(f"Unknown policy '{name}'. Registered policies: {', '.join(policy_names())}")
    return name, options


def policy_factory(cfg: DictConfig, sim: Suite | None) -> tuple[str, Callable[[], Policy]]:
    """(policy name, a picklable zero-argument factory) from the `policy` group, for the suite `sim`."""
    from vla_runtime.policies import make_policy

    name, options = policy_spec(cfg)
    return name, functools.partial(make_policy, name, suite=sim, **options)


def positive_int(cfg: DictConfig, key: str) -> int:
    value = cfg[key]
    if not isinstance(value, int) or value < 1:
        raise UsageError(f"{key} must be a positive integer, got {value!r}")
    return value


def command_line(program: str) -> str:
    """The command as the user typed it (program + hydra overrides), to store beside its results."""
    from hydra.core.hydra_config import HydraConfig

    return " ".join([program, *HydraConfig.get().overrides.task])


def write_json(path: Path, content: Any) -> None:
    """Write via a temporary file so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    tmp.replace(path)


def friendly_errors(main: Callable[..., Any]) -> Callable[..., Any]:
    """Known bad input (unknown task, camera, policy, ...) -> one clear line on stderr, exit 2."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        # ImportError: an optional dependency (LIBERO, SIMPLER, lerobot) is missing; the message says how to add it.
        except (UsageError, ValueError, FileNotFoundError, ImportError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    return wrapper
