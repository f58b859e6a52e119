"""Meta-World v3 (MuJoCo): the suite registered as `metaworld` (configs/sim/metaworld.yaml)."""

from vla_runtime.sim.metaworld.suite import (
    INSTRUCTIONS,
    MT10,
    MT50,
    MetaWorldConfig,
    MetaWorldEnv,
    MetaWorldSuite,
    resolve_task,
)

__all__ = ["INSTRUCTIONS", "MT10", "MT50", "MetaWorldConfig", "MetaWorldEnv", "MetaWorldSuite", "resolve_task"]
