"""Simulators (Meta-World is the embedded default) and the evaluation runner."""

from vla_runtime.sim.rendering import configure_headless_gl

# Before anything imports MuJoCo's GL backends.
configure_headless_gl()

from vla_runtime.sim.metaworld_suite import (  # noqa: E402
    INSTRUCTIONS,
    MT10,
    MT50,
    MetaWorldConfig,
    MetaWorldEnv,
    resolve_task,
    resolve_tasks,
)

__all__ = ["INSTRUCTIONS", "MT10", "MT50", "MetaWorldConfig", "MetaWorldEnv", "resolve_task", "resolve_tasks"]
