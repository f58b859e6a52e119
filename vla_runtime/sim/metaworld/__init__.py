"""Meta-World v3 (MuJoCo): the suite registered as `metaworld` (configs/sim/metaworld.yaml)."""

from vla_runtime.sim.rendering import configure_headless_gl

# Before MuJoCo's GL backends are imported (MuJoCo reads MUJOCO_GL once).
configure_headless_gl()

from vla_runtime.sim.metaworld.suite import (  # noqa: E402
    INSTRUCTIONS,
    MT10,
    MT50,
    MetaWorldConfig,
    MetaWorldEnv,
    MetaWorldSuite,
    resolve_task,
)

__all__ = ["INSTRUCTIONS", "MT10", "MT50", "MetaWorldConfig", "MetaWorldEnv", "MetaWorldSuite", "resolve_task"]
