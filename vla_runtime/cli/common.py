"""Pieces every CLI shares: config -> objects, and failing with a message instead of a traceback."""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vla_runtime.cli import CONFIG_MODULE, CONFIG_PATH
from vla_runtime.plugins import did_you_mean
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
        raise UsageError(f"Unknown policy '{name}'{did_you_mean(name, policy_names())}. "
                         f"Registered policies: {', '.join(policy_names())}")
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
            _fail(str(exc))

    return wrapper


def check_overrides(config_name: str, overrides: list[str], version_base: str | None) -> None:
    """Composes `config_name` with the command line's overrides once before hydra runs, so that what hydra itself
    refuses (an unknown config group option such as sim=no_such_suite, an unknown key, a malformed value) is one
    line and exit 2 like every other bad input, with the valid choices and a near miss. Hydra's own flags
    (--help, --cfg, -m, ...) are left to hydra."""
    if any(arg.startswith("-") for arg in overrides):
        return
    from hydra.errors import HydraException, MissingConfigException

    try:
        _compose(config_name, overrides, version_base)
    except MissingConfigException as exc:
        group, _, name = (exc.missing_cfg_file or "").rpartition("/")
        if not exc.options:  # not a group option: hydra's message says what is missing
            _fail(" ".join(str(exc).split("Config search path")[0].split()))
        _fail(f"Unknown {group} '{name}'{did_you_mean(name, exc.options)}. Choices: {', '.join(exc.options)}")
    except HydraException as exc:
        message = " ".join(str(exc).split())
        key = re.match(r"Could not override '([^']+)'", message)
        if key:
            others = [arg for arg in overrides if not arg.lstrip("+~").startswith(f"{key.group(1)}=")]
            message += _near_key(config_name, key.group(1), others, version_base)
        _fail(message)


def _compose(config_name: str, overrides: list[str], version_base: str | None) -> DictConfig:
    from hydra import compose, initialize_config_module

    with initialize_config_module(CONFIG_MODULE, version_base=version_base):
        return compose(config_name, overrides=overrides)


def _near_key(config_name: str, key: str, overrides: list[str], version_base: str | None) -> str:
    """' (did you mean ...?)' for a mistyped config key, from the keys beside it in the config the other overrides
    compose (policy=lerobot: the lerobot policy's keys)."""
    parent, _, last = key.rpartition(".")
    composed = _compose(config_name, overrides, version_base)
    node = OmegaConf.select(composed, parent) if parent else composed
    return did_you_mean(last, node.keys()) if isinstance(node, DictConfig) else ""


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def hydra_cli(config_name: str, version_base: str | None = "1.3") -> Callable[[Callable[[DictConfig], Any]], Callable]:
    """`@hydra.main` for a vla_runtime CLI (configs from the package), with every known bad input one clear line and
    exit 2: hydra's config errors by `check_overrides`, the task's own by `friendly_errors`."""
    import hydra

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        hydra_main = hydra.main(config_path=CONFIG_PATH, config_name=config_name,
                                version_base=version_base)(friendly_errors(task))

        @functools.wraps(task)
        def main() -> Any:
            check_overrides(config_name, sys.argv[1:], version_base)
            return hydra_main()

        return main

    return decorate
